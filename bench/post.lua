-- wrk script: POST a small OpenAI chat request and print a parseable summary.
--
-- Environment:
--   BENCH_MODEL         model name in the body (default "bench-model")
--   BENCH_API_KEY       sent as "Authorization: Bearer <key>" (default "sk-bench")
--
-- done() prints one line "BENCH_RESULT {json}" with counts and latency
-- percentiles in microseconds; bench/run.py parses it.

local model = os.getenv("BENCH_MODEL") or "bench-model"
local api_key = os.getenv("BENCH_API_KEY") or "sk-bench"

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. api_key
wrk.body = '{"model":"' .. model .. '","messages":['
  .. '{"role":"system","content":"You are a concise assistant."},'
  .. '{"role":"user","content":"Give me one sentence about the sea."}'
  .. '],"max_tokens":32}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%.0f,"mean":%.1f,"stdev":%.1f,"max":%.0f,'
      .. '"p50":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
