-- wrk script: POST a 22-byte JSON body (the body size of the TorchServe comparison).
wrk.method = "POST"
wrk.body = '{"text": "I love it!"}'
wrk.headers["Content-Type"] = "application/json"
