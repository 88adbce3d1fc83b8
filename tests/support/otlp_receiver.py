#!/usr/bin/env python3
"""An OTLP/HTTP logs receiver that is not ours: decodes POST /v1/logs bodies with the
OpenTelemetry project's own protobuf definitions (PyPI `opentelemetry-proto`) and appends one
line per log record, `origin seq header`, to OUT (flushed and fsynced before it answers 200).

Usage: otlp_receiver.py PORT OUT
"""
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

PORT, OUT = int(sys.argv[1]), sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/logs" or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_response(404)
            self.end_headers()
            return
        req = logs_service_pb2.ExportLogsServiceRequest()
        req.ParseFromString(body)
        header = self.headers.get("x-clawmesh-test", "-")
        lines = []
        for rl in req.resource_logs:
            for sl in rl.scope_logs:
                for lr in sl.log_records:
                    attrs = {kv.key: kv.value for kv in lr.attributes}
                    origin = attrs["clawmesh.origin"].string_value
                    seq = attrs["clawmesh.seq"].int_value
                    lines.append(f"{origin} {seq} {header} {lr.severity_number} {lr.time_unix_nano}\n")
        with open(OUT, "a") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        out = logs_service_pb2.ExportLogsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.allow_reuse_address = True
print("ready", flush=True)
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
