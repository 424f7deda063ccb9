"""`difftrain serve`: AUTOMATIC1111's HTTP API (and a job API of our own) over models loaded once.

    requests.py  the A1111 request shapes, checked against the server's limits
    engine.py    the served models and how one request becomes images (own scheduler per request)
    jobs.py      the FIFO queue and its one worker: progress, interrupt, skip, cancel
    app.py       the FastAPI app: routes, authentication, JSON errors
"""
