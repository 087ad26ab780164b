-- wrk script for bench/step.sh: each request holds a worker for SLEEP_MS (the demo model's
-- sleep_ms), so the number of workers, not the HTTP stack, limits throughput.
wrk.method = "POST"
wrk.body = '{"text": "a good day", "sleep_ms": ' .. (os.getenv("SLEEP_MS") or "20") .. '}'
wrk.headers["Content-Type"] = "application/json"
