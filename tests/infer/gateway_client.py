#!/usr/bin/python3
"""A real HTTP client for the gateway tests (Python's http.client, no solvernet code).

Usage: gateway_client.py HOST:PORT SCENARIO ARGS...
  request METHOD PATH BODY [KEY]   one request; BODY is sent as is ("-" for none)
  stream PATH BODY [KEY]           one streamed request, every Server-Sent Event parsed
  disconnect PATH BODY EVENTS      reads EVENTS events of a stream, then closes the socket
  concurrent N PATH BODY           N streams at once, one thread each
  big PATH BYTES                   a request body of BYTES bytes
Prints one JSON object on stdout; exit 0 unless the client itself failed.
"""
import http.client
import json
import sys
import threading

address, scenario, args = sys.argv[1], sys.argv[2], sys.argv[3:]
host, port = address.rsplit(":", 1)
TIMEOUT_S = 30  # a request that takes longer counts as hung


def connect():
    return http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)


def headers_for(key=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    return headers


def parse(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def request(method, path, body, key=None):
    conn = connect()
    conn.request(method, path, body=None if body == "-" else body.encode(), headers=headers_for(key))
    resp = conn.getresponse()
    text = resp.read().decode("utf-8", "replace")
    conn.close()
    return {"status": resp.status, "content_type": resp.getheader("Content-Type", ""),
            "retry_after": resp.getheader("Retry-After", ""), "body": parse(text)}


def read_events(resp, limit=None):
    """Parses "data: ..." events; returns (events, saw_done)."""
    events = []
    while limit is None or len(events) < limit:
        line = resp.readline()
        if not line:
            return events, False
        line = line.decode("utf-8", "replace").rstrip("\r\n")
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return events, True
        events.append(json.loads(data))
    return events, False


def event_text(event):
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice["text"] or ""
    return (choice.get("delta") or {}).get("content") or ""


def stream(path, body, key=None):
    conn = connect()
    conn.request("POST", path, body=body.encode(), headers=headers_for(key))
    resp = conn.getresponse()
    result = {"status": resp.status, "content_type": resp.getheader("Content-Type", ""),
              "retry_after": resp.getheader("Retry-After", "")}
    if resp.status != 200:
        result["body"] = parse(resp.read().decode("utf-8", "replace"))
        conn.close()
        return result
    events, done = read_events(resp)
    conn.close()
    result.update({"events": events, "done": done, "text": "".join(event_text(e) for e in events)})
    finishes = [c.get("finish_reason") for e in events for c in (e.get("choices") or []) if c.get("finish_reason")]
    result["finish_reason"] = finishes[-1] if finishes else None
    return result


def disconnect(path, body, count):
    conn = connect()
    conn.request("POST", path, body=body.encode(), headers=headers_for())
    resp = conn.getresponse()
    events, done = read_events(resp, count)
    conn.sock.close()  # mid-stream, without a word
    conn.close()
    return {"status": resp.status, "events_read": len(events), "done": done}


def concurrent(n, path, body):
    results = [None] * n

    def one(i):
        try:
            results[i] = stream(path, body)
        except Exception as e:  # a timeout is a hang; anything else is reported as is
            results[i] = {"status": 0, "exception": type(e).__name__ + ": " + str(e)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"statuses": statuses,
            "completed": sum(1 for r in results if r["status"] == 200 and r.get("done")),
            "refused_with_retry_after": sum(1 for r in results if r["status"] in (429, 503) and r["retry_after"]),
            "exceptions": [r["exception"] for r in results if "exception" in r],
            "texts": sorted({r["text"] for r in results if r["status"] == 200})}


def big(path, size):
    body = '{"prompt": "' + "a" * (size - 16) + '"}'
    try:
        return request("POST", path, body)
    except (BrokenPipeError, ConnectionResetError) as e:
        return {"status": 0, "exception": type(e).__name__}


if scenario == "request":
    out = request(args[0], args[1], args[2], args[3] if len(args) > 3 else None)
elif scenario == "stream":
    out = stream(args[0], args[1], args[2] if len(args) > 2 else None)
elif scenario == "disconnect":
    out = disconnect(args[0], args[1], int(args[2]))
elif scenario == "concurrent":
    out = concurrent(int(args[0]), args[1], args[2])
elif scenario == "big":
    out = big(args[0], int(args[1]))
else:
    sys.exit("unknown scenario " + scenario)
print(json.dumps(out))
