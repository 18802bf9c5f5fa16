"""`qcompile serve`: an OpenAI-compatible HTTP server over one loaded decoder.

- `protocol`: the OpenAI wire format (request bodies, response and stream-chunk bodies) and how a request
  becomes prompt ids and `SamplingParams`;
- `errors`: the OpenAI-style error body every refusal is answered with;
- `queue`: the bounded admission queue and the one worker thread that owns the model's engine (its calls
  block) and runs the requests in a continuous batch (`run.batching`);
- `app`: the FastAPI app (routes, streaming as server-sent events, disconnects);
- `server`: binding the socket and running uvicorn, in the foreground or in a background thread.
"""
