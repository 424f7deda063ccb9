from difftrain.cli import main

raise SystemExit(main())
