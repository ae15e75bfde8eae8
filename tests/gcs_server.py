"""A Google Cloud Storage JSON API server on loopback for the tests, keeping every byte of every object.

gcp-storage-emulator lost a trailing `\\r` from uploads (gcsfs ends its multipart bodies with a bare `\\n`
before the boundary, which the emulator took for part of a CRLF), so zarr chunks ending in that byte came back
damaged and the GCS tests passed or failed by chance. This server implements the subset of the API that
gcsfs (the plain `GCSFileSystem`, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false) calls, faithfully enough for what
the tests check: buckets (get, list; made by the constructor), objects (list with prefix, delimiter, offsets and
pages; get metadata; download with Range; patch; delete), uploads (multipart, parsed byte for byte; resumable in
chunks), rewriteTo, moveTo and compose, and the generation/metageneration preconditions on every write, so
`ifGenerationMatch=0` creates exclusively as on GCS. No batch requests: gcsfs sends those only to Google's own
host. Objects live in memory; requests outside this subset get a 400 that names them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

try:
    import google_crc32c
except ImportError:  # the checksum is then left out, as GCS leaves out what it has not computed
    google_crc32c = None  # type: ignore[assignment]

SETTABLE = ("contentType", "contentEncoding", "contentDisposition", "contentLanguage", "cacheControl",
            "customTime", "metadata")  # object fields a client chooses; the rest the server computes


class Failure(Exception):
    """An error response, in GCS's shape."""

    def __init__(self, code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class GcsServer:
    """The server: `start()` serves in a thread at `.url`, `stop()` closes its socket and its connections."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, buckets: list[str] | tuple[str, ...] = ()) -> None:
        self.host, self.port = host, port
        self.buckets: dict[str, dict[str, Any]] = {}  # name -> bucket resource
        self.store: dict[str, dict[str, tuple[bytes, dict[str, Any]]]] = {}  # bucket -> name -> (data, resource)
        self.uploads: dict[str, dict[str, Any]] = {}  # resumable upload id -> bucket, fields, query, data so far
        self.requests: list[str] = []  # "METHOD /path?query" of each request, for tests to see which calls were made
        self.lock = threading.Lock()
        self.generation = 0
        for name in buckets:
            self.create_bucket(name)
        self._httpd: _Http | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> GcsServer:
        self._httpd = _Http((self.host, self.port), _Handler)
        self._httpd.gcs = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="gcs-server",
                                        daemon=True)  # a stop waits for one poll
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None or self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        for connection in list(self._httpd.connections):  # keep-alive connections would go on being served
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join()
        self._httpd = self._thread = None

    def create_bucket(self, name: str) -> dict[str, Any]:
        now = _now()
        meta = {"kind": "storage#bucket", "id": name, "name": name, "projectNumber": "0", "metageneration": "1",
                "location": "US", "storageClass": "STANDARD", "etag": "CAE=", "timeCreated": now, "updated": now}
        self.buckets[name], self.store[name] = meta, {}
        return meta

    # What the handler calls, under the lock.

    def objects(self, bucket: str) -> dict[str, tuple[bytes, dict[str, Any]]]:
        if bucket not in self.store:
            raise Failure(404, "The specified bucket does not exist.", "notFound")
        return self.store[bucket]

    def get(self, bucket: str, name: str, query: dict[str, str]) -> tuple[bytes, dict[str, Any]]:
        found = self.objects(bucket).get(name)
        if found is None or query.get("generation", found[1]["generation"]) != found[1]["generation"]:
            raise Failure(404, f"No such object: {bucket}/{name}", "notFound")
        return found

    def check(self, bucket: str, name: str, query: dict[str, str]) -> None:
        """The preconditions of a write or delete: a missing object has generation 0 and no metageneration."""
        found = self.objects(bucket).get(name)
        generation = int(found[1]["generation"]) if found else 0
        metageneration = int(found[1]["metageneration"]) if found else None
        held = [("ifGenerationMatch" not in query or int(query["ifGenerationMatch"]) == generation),
                ("ifGenerationNotMatch" not in query or int(query["ifGenerationNotMatch"]) != generation),
                ("ifMetagenerationMatch" not in query or int(query["ifMetagenerationMatch"]) == metageneration),
                ("ifMetagenerationNotMatch" not in query or int(query["ifMetagenerationNotMatch"]) != metageneration)]
        if not all(held):
            raise Failure(412, "At least one of the pre-conditions you specified did not hold.", "conditionNotMet")

    def put(self, bucket: str, name: str, data: bytes, fields: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        """Store a new generation of an object, every byte as given; its resource as GCS returns it."""
        self.check(bucket, name, query)
        self.generation = max(self.generation + 1, time.time_ns() // 1000)  # GCS: microseconds, increasing
        now = _now()
        meta = {"contentType": "application/octet-stream", **{k: fields[k] for k in SETTABLE if k in fields},
                "kind": "storage#object", "id": f"{bucket}/{name}/{self.generation}", "name": name, "bucket": bucket,
                "generation": str(self.generation), "metageneration": "1", "size": str(len(data)),
                "md5Hash": _b64(hashlib.md5(data).digest()), "etag": _b64(self.generation.to_bytes(8, "big")),
                "storageClass": "STANDARD", "timeCreated": now, "updated": now, "timeStorageClassUpdated": now}
        if google_crc32c is not None:
            meta["crc32c"] = _b64(google_crc32c.value(data).to_bytes(4, "big"))
        self.objects(bucket)[name] = (bytes(data), meta)
        return meta


class _Http(ThreadingHTTPServer):
    daemon_threads = True
    gcs: GcsServer

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error of the server
            super().handle_error(request, client_address)


OBJECT = r"/storage/v1/b/([^/]+)/o/"  # an object's path; its name is one percent-encoded segment, as gcsfs sends it
ROUTES: list[tuple[str, str, str]] = [  # (methods, path pattern, handler method), the first match wins
    ("POST", OBJECT + r"([^/]+)/rewriteTo/b/([^/]+)/o/([^/]+)", "rewrite"),
    ("POST", OBJECT + r"([^/]+)/moveTo/o/([^/]+)", "move"),
    ("POST", OBJECT + r"([^/]+)/compose", "compose"),
    ("GET", r"(?:/download)?" + OBJECT + r"(.+)", "get_object"),
    ("PATCH", OBJECT + r"(.+)", "patch_object"),
    ("DELETE", OBJECT + r"(.+)", "delete_object"),
    ("GET", r"/storage/v1/b/([^/]+)/o", "list_objects"),
    ("POST PUT DELETE", r"/upload/storage/v1/b/([^/]+)/o", "upload"),
    ("GET", r"/storage/v1/b/([^/]+)", "get_bucket"),
    ("GET", r"/storage/v1/b", "list_buckets"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gcsfs's aiohttp session expects
    disable_nagle_algorithm = True  # a reply is two writes (headers, body): else the body waits ~40 ms for an ACK
    server: _Http

    def setup(self) -> None:
        super().setup()
        self.server.connections.add(self.connection)

    def finish(self) -> None:
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _dispatch(self) -> None:
        """Answer one request: the handler method of its route runs under the lock, the reply is sent after."""
        parts = urlsplit(self.path)
        self.query = dict(parse_qsl(parts.query, keep_blank_values=True))
        self.data = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # gcsfs never sends chunked
        self.server.gcs.requests.append(f"{self.command} {self.path}")
        try:
            route = next(((name, match) for methods, pattern, name in ROUTES
                          if self.command in methods.split() and (match := re.fullmatch(pattern, parts.path))), None)
            if route is None:
                raise Failure(400, f"tests/gcs_server.py does not implement {self.command} {parts.path}", "unsupported")
            with self.server.gcs.lock:
                getattr(self, route[0])(self.server.gcs, *[unquote(g) for g in route[1].groups()])
        except Exception as err:  # a request this server cannot follow fails loudly, not retried as a 5xx
            if not isinstance(err, Failure):
                err = Failure(400, f"tests/gcs_server.py failed on {self.command} {self.path}: {err!r}", "badRequest")
            self._json({"error": {"code": err.code, "message": err.message,
                                  "errors": [{"message": err.message, "domain": "global", "reason": err.reason}]}},
                       err.code)
        status, body, headers = self.reply
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.reply = (status, body, headers or {})

    def _json(self, obj: dict[str, Any], status: int = 200) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json; charset=UTF-8"})

    # Buckets.

    def get_bucket(self, gcs: GcsServer, bucket: str) -> None:
        gcs.objects(bucket)
        self._json(gcs.buckets[bucket])

    def list_buckets(self, gcs: GcsServer) -> None:
        self._json({"kind": "storage#buckets", "items": [gcs.buckets[b] for b in sorted(gcs.buckets)]})

    # Objects.

    def list_objects(self, gcs: GcsServer, bucket: str) -> None:
        """Names in order from `startOffset` up to `endOffset` under `prefix`; those with `delimiter` after the
        prefix are folded into `prefixes`. A page holds `maxResults` entries of both kinds together."""
        objects, q = gcs.objects(bucket), self.query
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        after = base64.urlsafe_b64decode(q["pageToken"]).decode() if q.get("pageToken") else None
        entries: dict[str, dict[str, Any] | None] = {}  # listed name or folded prefix -> resource (None: a prefix)
        start, end = q.get("startOffset", ""), q.get("endOffset")
        for name, (_, meta) in objects.items():
            if not name.startswith(prefix) or name < start or (end and name >= end):
                continue
            cut = name.find(delimiter, len(prefix)) if delimiter else -1
            entries.setdefault(name[:cut + len(delimiter)] if cut >= 0 else name, None if cut >= 0 else meta)
        keys = sorted(key for key in entries if after is None or key > after)
        page = keys[:min(int(q.get("maxResults") or 1000), 1000)]
        out: dict[str, Any] = {"kind": "storage#objects"}
        if len(page) < len(keys):
            out["nextPageToken"] = base64.urlsafe_b64encode(page[-1].encode()).decode()
        if prefixes := [key for key in page if entries[key] is None]:
            out["prefixes"] = prefixes
        if items := [entries[key] for key in page if entries[key] is not None]:
            out["items"] = items
        self._json(out)

    def get_object(self, gcs: GcsServer, bucket: str, name: str) -> None:
        data, meta = gcs.get(bucket, name, self.query)
        if self.query.get("alt") != "media":
            return self._json(meta)
        headers = {"Content-Type": meta["contentType"], "X-Goog-Generation": meta["generation"],
                   "X-Goog-Hash": ",".join(f"{k}={meta[h]}" for k, h in (("crc32c", "crc32c"), ("md5", "md5Hash"))
                                           if h in meta)}
        asked = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not asked or not data or asked.groups() == ("", ""):  # a range of an empty object: all of it, i.e. nothing
            return self._send(200, data, headers)
        first, last = asked.groups()
        start = max(len(data) - int(last), 0) if not first else int(first)  # "bytes=-n": the last n bytes
        end = len(data) - 1 if not first or not last else min(int(last), len(data) - 1)
        if start >= len(data) or end < start:
            raise Failure(416, "InvalidRange: the requested range is not satisfiable.", "requestedRangeNotSatisfiable")
        self._send(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})

    def patch_object(self, gcs: GcsServer, bucket: str, name: str) -> None:
        gcs.get(bucket, name, self.query)
        gcs.check(bucket, name, self.query)
        data, meta = gcs.objects(bucket)[name]
        change = json.loads(self.data or b"{}")
        if "metadata" in change:  # GCS merges custom metadata; a null value removes its key
            merged = {**meta.get("metadata", {}), **(change.pop("metadata") or {})}
            change["metadata"] = {k: v for k, v in merged.items() if v is not None}
        meta = {**meta, **{k: change[k] for k in SETTABLE if k in change}, "updated": _now(),
                "metageneration": str(int(meta["metageneration"]) + 1)}
        gcs.objects(bucket)[name] = (data, meta)
        self._json(meta)

    def delete_object(self, gcs: GcsServer, bucket: str, name: str) -> None:
        gcs.get(bucket, name, self.query)
        gcs.check(bucket, name, self.query)
        del gcs.objects(bucket)[name]
        self._send(204)

    def rewrite(self, gcs: GcsServer, bucket: str, name: str, to_bucket: str, to_name: str) -> None:
        """A copy in one call (`done` at once); the source's fields unless the body gives others."""
        data, meta = gcs.get(bucket, name, {"generation": self.query["sourceGeneration"]}
                             if self.query.get("sourceGeneration") else {})
        fields = json.loads(self.data) if self.data.strip() else meta
        gcs.objects(to_bucket)
        copied = gcs.put(to_bucket, to_name, data, fields, self.query)
        self._json({"kind": "storage#rewriteResponse", "totalBytesRewritten": str(len(data)),
                    "objectSize": str(len(data)), "done": True, "resource": copied})

    def move(self, gcs: GcsServer, bucket: str, name: str, to_name: str) -> None:
        data, meta = gcs.get(bucket, name, {"generation": self.query["sourceGeneration"]}
                             if self.query.get("sourceGeneration") else {})
        moved = gcs.put(bucket, to_name, data, meta, self.query)
        if to_name != name:
            del gcs.objects(bucket)[name]
        self._json(moved)

    def compose(self, gcs: GcsServer, bucket: str, name: str) -> None:
        request = json.loads(self.data)
        parts = [gcs.get(bucket, source["name"], {"generation": str(source["generation"])}
                         if "generation" in source else {})[0] for source in request["sourceObjects"]]
        self._json(gcs.put(bucket, name, b"".join(parts), request.get("destination", {}), self.query))

    # Uploads.

    def upload(self, gcs: GcsServer, bucket: str) -> None:
        gcs.objects(bucket)
        q, kind = self.query, self.query.get("uploadType")
        if "upload_id" in q:
            return self._resume(gcs, q["upload_id"])
        if kind == "multipart":
            fields, data = _multipart(self.headers.get("Content-Type", ""), self.data)
            return self._json(gcs.put(bucket, fields.get("name") or q["name"], data, fields, q))
        if kind == "resumable":
            fields = json.loads(self.data) if self.data.strip() else {}
            fields.setdefault("name", q.get("name"))
            fields.setdefault("contentType", self.headers.get("X-Upload-Content-Type", "application/octet-stream"))
            upload_id = uuid.uuid4().hex
            gcs.uploads[upload_id] = {"bucket": bucket, "fields": fields, "query": q, "data": bytearray()}
            location = f"http://{self.headers['Host']}/upload/storage/v1/b/{quote(bucket, safe='')}/o?" \
                       f"uploadType=resumable&upload_id={upload_id}"
            return self._send(200, b"", {"Location": location})
        raise Failure(400, f"tests/gcs_server.py does not implement uploadType={kind}", "unsupported")

    def _resume(self, gcs: GcsServer, upload_id: str) -> None:
        """One chunk of a resumable upload at its offset: 308 and the bytes held so far until the last one."""
        upload = gcs.uploads.get(upload_id)
        if upload is None:
            raise Failure(404, f"No such upload: {upload_id}", "notFound")
        if self.command == "DELETE":
            del gcs.uploads[upload_id]
            return self._send(499)  # what GCS answers a cancelled upload
        held: bytearray = upload["data"]
        ranged = re.fullmatch(r"bytes (?:\*|(\d+)-\d+)/(\*|\d+)", self.headers.get("Content-Range", "").strip())
        start, total = (int(ranged[1] or len(held)), ranged[2]) if ranged else (0, str(len(self.data)))
        if start > len(held):
            raise Failure(400, f"a chunk at byte {start} leaves a gap after byte {len(held)}", "badRequest")
        held += self.data[len(held) - start:]
        if total == "*" or len(held) < int(total):
            return self._send(308, b"", {"Range": f"bytes=0-{len(held) - 1}"} if held else {})
        if len(held) > int(total):
            raise Failure(400, f"{len(held)} bytes uploaded for an object of {total}", "badRequest")
        del gcs.uploads[upload_id]
        fields = upload["fields"]
        self._json(gcs.put(upload["bucket"], fields["name"], bytes(held), fields, upload["query"]))


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON metadata and the media of a multipart/related upload, byte for byte.

    The line break after the opening boundary (gcsfs: `\\n`, others `\\r\\n`) is the one of every delimiter, so
    a media part ending in `\\r` keeps it. The media ends at the last closing delimiter."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = str(header.get_param("boundary") or "").encode()
    opening = b"--" + boundary
    if not boundary or not body.startswith(opening):
        raise Failure(400, "a multipart upload without its boundary", "badRequest")
    newline = b"\r\n" if body[len(opening):].startswith(b"\r\n") else b"\n"
    delimiter, rest = newline + opening, body[len(opening) + len(newline):]
    split, close = rest.find(delimiter), rest.rfind(delimiter + b"--")
    if split < 0 or close < split:
        raise Failure(400, "a multipart upload needs a metadata part and a media part", "badRequest")
    meta_part, media_part = rest[:split], rest[split + len(delimiter) + len(newline):close]
    fields: dict[str, Any] = json.loads(_part_body(meta_part, newline)[1] or b"{}")
    part_type, media = _part_body(media_part, newline)
    if part_type and "contentType" not in fields:
        fields["contentType"] = part_type
    return fields, media


def _part_body(part: bytes, newline: bytes) -> tuple[str, bytes]:
    """A part's Content-Type and its body (everything after the blank line that ends its headers)."""
    head, _, body = (b"", b"", part[len(newline):]) if part.startswith(newline) else part.partition(newline * 2)
    types = [line.split(b":", 1)[1].strip().decode() for line in head.split(newline)
             if line.lower().startswith(b"content-type:")]
    return (types[0] if types else ""), body
