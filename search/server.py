"""The search page and its JSON API over HTTP (standard library only); the answers come from the app it is given."""
import json
import re
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Search the archive</title><style>
body{font:15px system-ui,sans-serif;margin:24px;color:#222} h1{font-size:22px;margin:0 0 12px}
input[type=search]{font-size:16px;width:28em;padding:4px} input[type=number]{width:4.5em} #info{color:#555}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:14px}
.result img{width:100%;aspect-ratio:1;object-fit:cover;cursor:pointer;border-radius:4px;background:#eee}
.result div{font-size:13px;overflow-wrap:anywhere}</style></head><body>
<h1>Search the archive</h1><form id="form"><input type="search" id="q" placeholder="a bridge over a river">
<label>results <input type="number" id="k" min="1" max="1000" value="12"></label>
<button>Search</button> or by an image: <input type="file" id="file" accept="image/*"></form>
<p id="info">Type a description, upload an image, or click a result to find images like it.</p><div id="grid"></div>
<script>
const grid = document.getElementById("grid"), info = document.getElementById("info");
const q = document.getElementById("q"), k = document.getElementById("k"), file = document.getElementById("file");
let last = null;  // the search shown: asked again when the number of results changes
function count() {  // the number of results asked, 1 to 1000 as the API takes it (12 for what is not a number)
  const n = Math.round(Number(k.value));
  return k.value.trim() && n >= 1 ? Math.min(n, 1000) : 12;
}
function card(hit, rank) {
  const box = document.createElement("div"), img = new Image(), text = document.createElement("div");
  box.className = "result"; img.src = "/image/" + hit.id; img.title = "find images like this one";
  img.onclick = () => run("id=" + hit.id);
  const tile = hit.tile ? " @" + hit.tile[0] + "," + hit.tile[1] : "";
  text.textContent = (rank + 1) + ". " + hit.score.toFixed(3) + " " + hit.path.split("/").pop() + tile;
  box.append(img, text); return box;
}
async function run(query, upload) {
  last = [query, upload]; k.value = count(); info.textContent = "searching...";
  const answer = await (await fetch("/api/search?" + query + "&k=" + count(),
                                    upload ? {method: "POST", body: upload} : {})).json();
  const n = answer.results ? answer.results.length : 0;
  info.textContent = answer.error ? "error: " + answer.error : n + (n === 1 ? " result" : " results") + " for " +
    answer.query;
  grid.replaceChildren(...(answer.results || []).map(card));
}
function remember() {  // the text and the number of results in the address: a link or a reload shows the same
  history.replaceState(null, "", "?" + new URLSearchParams(q.value.trim() ? {q: q.value, k: count()} : {k: count()}));
}
function ask() {
  remember();
  if (q.value.trim()) return run("q=" + encodeURIComponent(q.value));
  last = null; grid.replaceChildren();
  info.textContent = "Type what to look for first, e.g. a bridge over a river (or upload an image).";
}
document.getElementById("form").onsubmit = event => { event.preventDefault(); ask(); };
k.onchange = () => { k.value = count(); remember(); if (last) run(...last); };
file.onchange = () => file.files.length && run("", file.files[0]);
const asked = new URLSearchParams(location.search);
if (asked.has("k")) k.value = asked.get("k");
k.value = count();
if (asked.has("q")) { q.value = asked.get("q"); ask(); }
</script></body></html>"""


class Handler(BaseHTTPRequestHandler):
    """The page, GET/POST /api/search and GET /image/N (the N-th entry's thumbnail); no other path is served."""

    def reply(self, code, body, kind="application/json"):
        body = json.dumps(body).encode() if isinstance(body, dict) else body
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url, app = urlsplit(self.path), self.server.app
        image = re.fullmatch(r"/image/(\d{1,12})", url.path)  # still percent-encoded: %2e%2e cannot match
        if url.path == "/":
            self.reply(200, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/search":
            self.reply(*app["search"](parse_qs(url.query), None))
        elif image and int(image[1]) < len(app["entries"]) and (thumb := app["thumbnail"](int(image[1]))):
            self.reply(200, thumb, "image/jpeg")
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        url, app = urlsplit(self.path), self.server.app
        length = self.headers.get("Content-Length", "")
        if url.path != "/api/search":
            self.reply(404, {"error": "not found"})
        elif not length.isdigit() or int(length) == 0:
            self.reply(400, {"error": "POST an image file as the request body"})
        elif int(length) > app["max_upload"]:
            self.close_connection = True  # the body is not read
            self.reply(413, {"error": f"the image is over {app['max_upload']} bytes"})
        else:
            self.reply(*app["search"](parse_qs(url.query), self.rfile.read(int(length))))
