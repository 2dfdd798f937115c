"""The web demo: upload a scan, ask a question, see the answer and where each latent step looked.

`DemoService` holds everything that is not page layout (input checks, answering,
evidence maps, the example gallery) so it is testable without a browser;
`build_app` lays it out with Gradio (`pip install medlvr[web]`) and `serve`
launches it, on the loopback interface unless told otherwise. Every handler
turns a failure into a message on the page: a bad upload never takes the server
down, and no message shows a path on the server. Gradio itself names files by their
server path (the page's config, the upload API, file URLs): `HidePaths` replaces the
server's folder with a name of the same length in every response and back in every
request, and server errors never reach the browser (`show_error=False`).

Uploads are scans of patients: Gradio refuses a file over the limit while it is being
uploaded, the server keeps uploads in a folder of its own, deletes each one when its
request ends (and any left over, with the images the page was shown, after
`CACHE_MINUTES`), and deletes the whole folder when it stops.
"""

import atexit
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from medlvr import inference
from medlvr.config import ServeConfig
from medlvr.errors import MedlvrError
from medlvr.model.latent import LatentVLM

log = logging.getLogger(__name__)

# DICOM files often carry no extension; they are recognised by the marker at byte 128.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
CACHE_MINUTES = 10  # uploads never submitted, and the images served to the page, go after this
# An absolute path (POSIX or Windows): messages keep only its last component.
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/](?:[^\s'\"<>|\\/:]+[\\/])+([^\s'\"<>|\\/:]*)")


@dataclass
class Example:
    """One gallery entry."""

    image: Path
    question: str
    options: str  # one `A=text` per line
    caption: str


@dataclass
class Result:
    """What one request shows on the page."""

    ok: bool
    message: str  # the status line: an error, or a note
    answer: str = ""
    timing: str = ""
    evidence: Image.Image | None = None
    regions: dict[str, Any] | None = None
    preview: Image.Image | None = None
    request: int = 0  # 1, 2, ... in the order the server received requests


class InputError(MedlvrError):
    """An upload or form value the demo refuses, with the message shown on the page."""


def parse_options(text: str) -> dict[str, str]:
    """The options box: one option per line (`medlvr.inference.parse_options`' grammar)."""
    try:
        return inference.parse_options((text or "").splitlines(), "options (one per line)")
    except MedlvrError as err:
        raise InputError(str(err)) from None


class DemoService:
    """Input checks, answering and evidence maps for the web page (one request at a time)."""

    def __init__(
        self, vlm: LatentVLM, config: ServeConfig | None = None, upload_dir: Path | None = None
    ):
        self.vlm = vlm
        self.cfg = config or ServeConfig()
        self.upload_dir = (
            upload_dir  # where the server receives uploads: each is deleted when its request ends
        )
        # The model is shared and explanations switch its attention implementation: one request at a time.
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.requests = 0
        self.examples: list[Example] = []

    # ---------------------------------------------------------------- inputs
    def check_file(self, path: str | Path | None) -> Path:
        """Existence, size and type of an upload (before decoding anything)."""
        if path is None or str(path) == "":
            raise InputError("upload an image first (PNG, JPEG or DICOM)")
        p = Path(path)
        if not p.is_file():
            raise InputError("the upload did not arrive; please upload the image again")
        size = p.stat().st_size
        if size == 0:
            raise InputError(f"{p.name} is empty")
        limit = self.cfg.max_upload_mb * 1e6
        if size > limit:
            raise InputError(
                f"{p.name} is {size / 1e6:.1f} MB; the limit is {self.cfg.max_upload_mb:g} MB"
            )
        with p.open("rb") as fh:
            head = fh.read(132)
        if p.suffix.lower() not in IMAGE_SUFFIXES and head[128:132] != b"DICM":
            kind = p.suffix.lower() or "without extension"
            raise InputError(
                f"{p.name}: unsupported file type ({kind}); upload a PNG, JPEG or DICOM image"
            )
        return p

    def load(self, path: str | Path | None) -> Image.Image:
        """A checked, decoded RGB image within the dimension limits."""
        from medlvr.data.images import load_image

        p = self.check_file(path)
        try:
            image = load_image(p, max_pixels=self.cfg.max_side**2)
        except (ValueError, OSError) as err:
            raise InputError(f"{p.name} could not be read as an image: {_tail(err)}") from None
        w, h = image.size
        if min(w, h) < self.cfg.min_side:
            raise InputError(
                f"{p.name} is {w}x{h} pixels; each side must be at least {self.cfg.min_side}"
            )
        if max(w, h) > self.cfg.max_side:
            raise InputError(
                f"{p.name} is {w}x{h} pixels; each side must be at most {self.cfg.max_side}"
            )
        if max(w, h) / min(w, h) > self.cfg.max_aspect:
            raise InputError(
                f"{p.name} is {w}x{h} pixels; the long side may be at most {self.cfg.max_aspect:g}x the short one"
            )
        return image

    # ---------------------------------------------------------------- requests
    def answer(
        self,
        path: str | Path | None,
        question: str,
        options_text: str = "",
        latent_steps: int | float | None = None,
    ) -> Result:
        """Answer one request; never raises: failures come back as a message."""
        with self._count_lock:
            self.requests += 1
            number = self.requests
        try:
            result = self._answer(path, question, options_text, latent_steps)
        except MedlvrError as err:  # InputError included: the user's to fix
            result = Result(False, str(err))
        except Exception as err:  # a bug, not the user's fault: keep serving, and log it
            log.exception("demo request failed")
            result = Result(
                False,
                f"internal error ({type(err).__name__}: {_tail(err)}); the server keeps running",
            )
        finally:
            self.discard(path)
        result.message = without_paths(result.message)
        result.request = number
        return result

    def discard(self, path: str | Path | None) -> None:
        """Delete an upload (a file inside `upload_dir`, and its folder once empty); other paths stay."""
        if not path or self.upload_dir is None:
            return
        p, root = Path(path).resolve(), self.upload_dir.resolve()
        if root not in p.parents:
            return
        p.unlink(missing_ok=True)
        for folder in p.parents:  # Gradio puts each upload in a folder of its own
            if folder == root:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty
                break

    def _answer(self, path, question, options_text, latent_steps) -> Result:
        from medlvr.explain import explain, figure_image

        question = (question or "").strip()
        if not question:
            raise InputError("type a question")
        if len(question) > 1000:
            raise InputError(f"the question is {len(question)} characters long; the limit is 1000")
        options = parse_options(options_text)
        k = self.vlm.resolve_steps(latent_steps)
        if not 0 <= k <= self.cfg.max_latent_steps:
            raise InputError(f"latent steps must be in 0..{self.cfg.max_latent_steps}, got {k}")
        image = self.load(path)
        start = time.perf_counter()
        with self._lock:
            if k == 0:
                ans = inference.answer_one(
                    self.vlm,
                    [image],
                    question,
                    options,
                    latent_steps=0,
                    max_new_tokens=self.cfg.max_new_tokens,
                )
                text, gen_s, evidence, regions = ans.text, ans.seconds, None, None
                note = "K = 0: answered directly, so there are no latent steps to show."
            else:
                ex = explain(
                    self.vlm,
                    [image],
                    question,
                    options,
                    latent_steps=k,
                    max_new_tokens=self.cfg.max_new_tokens,
                )
                text, gen_s, regions = ex.answer, ex.seconds, ex.regions()
                evidence = figure_image(ex)
                note = "Evidence: per latent step, cosine similarity to the visual tokens (top rows) and attention to the image (bottom rows)."
        total = time.perf_counter() - start
        timing = f"answer in {gen_s * 1000:.0f} ms with K = {k} latent steps ({total * 1000:.0f} ms with evidence maps)"
        return Result(
            True,
            note,
            answer=text or "(empty answer)",
            timing=timing,
            evidence=evidence,
            regions=regions,
            preview=image,
        )

    # ---------------------------------------------------------------- gallery
    def make_examples(self, out_dir: Path) -> list[Example]:
        """A few synthetic benchmark scans with their questions, written as PNGs (for the gallery)."""
        if self.cfg.examples == 0:
            return []
        from medlvr.data.synth import SynthConfig, generate_samples

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = SynthConfig(
            n=max(40, 10 * self.cfg.examples), seed=self.cfg.examples_seed, describe=False
        )
        items = generate_samples(
            cfg, "test", range(min(self.cfg.examples, cfg.split_counts()["test"]))
        )
        self.examples = []
        for item in items:
            s = item.sample
            path = out / f"{s.id}.png"
            assert item.image is not None  # generate_samples renders by default
            Image.fromarray(item.image).save(path)
            opts = "\n".join(f"{k}={v}" for k, v in sorted(s.options.items()))
            self.examples.append(Example(path, s.question, opts, f"{s.modality}: {s.question}"))
        return self.examples


def _tail(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def without_paths(text: str) -> str:
    """`text` with every absolute path cut to its last component: the page never shows where files live."""
    return _PATH.sub(lambda m: m.group(1) or "(folder)", text)


# ---------------------------------------------------------------------------- the page

CSS = """
#status { min-height: 1.5em; }
#answer textarea { font-size: 1.2em; font-weight: 600; }
"""


def build_app(service: DemoService) -> Any:
    """The Gradio Blocks page around a `DemoService`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    cfg = service.cfg
    default_k = min(max(service.vlm.latent.steps, 0), cfg.max_latent_steps)
    age = CACHE_MINUTES * 60
    with gr.Blocks(
        title="MedLVR demo", analytics_enabled=False, delete_cache=(age // 2, age)
    ) as page:
        gr.Markdown(
            "## MedLVR: latent visual reasoning for medical VQA\n"
            "Upload a scan (PNG, JPEG or DICOM), ask a question, optionally give options (one per line, `A=text`), "
            "and pick the latent budget K. The model thinks for K continuous steps before answering; "
            "the evidence maps show where each step points."
        )
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(
                    label="Image (PNG, JPEG or DICOM)",
                    file_count="single",
                    type="filepath",
                    elem_id="upload",
                )
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                options = gr.Textbox(
                    label="Options (optional, one per line: A=text)", lines=3, elem_id="options"
                )
                steps = gr.Slider(
                    0,
                    cfg.max_latent_steps,
                    value=default_k,
                    step=1,
                    label="Latent steps K",
                    elem_id="steps",
                )
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
            with gr.Column(scale=1):
                status = gr.Markdown("", elem_id="status")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                timing = gr.Textbox(label="Time", interactive=False, elem_id="timing")
                preview = gr.Image(
                    label="Your image", type="pil", interactive=False, height=220, elem_id="preview"
                )
        evidence = gr.Image(
            label="Evidence maps", type="pil", interactive=False, elem_id="evidence"
        )
        regions = gr.JSON(label="Top regions", elem_id="regions")

        if service.examples:
            gr.Markdown("### Examples from the synthetic benchmark (click one to load it)")
            gallery = gr.Gallery(
                value=[(str(e.image), e.caption) for e in service.examples],
                columns=4,
                height="auto",
                object_fit="contain",
                allow_preview=False,
                show_label=False,
                elem_id="examples",
            )

            def pick(evt: gr.SelectData):
                e = service.examples[evt.index]
                return str(e.image), e.question, e.options

            gallery.select(pick, None, [upload, question, options])

        def run(path, q, opts, k):
            r = service.answer(
                path, q, opts, k
            )  # deletes the upload: the box is cleared (None) to match
            # The request number tells one answered request from the next when their messages are equal.
            message = (
                f"request {r.request}: {r.message}"
                if r.ok
                else f"**Error** (request {r.request}): {r.message}"
            )
            if not r.ok:
                return message, "", "", None, None, None, None
            return message, r.answer, r.timing, r.preview, r.evidence, r.regions, None

        submit.click(
            run,
            [upload, question, options, steps],
            [status, answer, timing, preview, evidence, regions, upload],
        )
    return page


def theme() -> Any:
    """The default theme with system fonts: the page must not wait for a font CDN offline."""
    import gradio as gr

    sans = ["ui-sans-serif", "system-ui", "Helvetica", "Arial", "sans-serif"]
    return gr.themes.Default(font=sans, font_mono=["ui-monospace", "Consolas", "monospace"])


class HidePaths:
    """ASGI middleware: `folder` (the server's absolute folder) becomes `alias` in responses and
    `alias` becomes `folder` again in requests. Same length: Content-Length stays right."""

    def __init__(self, app: Any, folder: str, alias: str):
        assert len(folder) == len(alias)
        self.app, self.folder, self.alias = app, folder.encode(), alias.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope = dict(scope)
        for key in ("raw_path", "query_string"):
            if isinstance(scope.get(key), bytes):
                scope[key] = scope[key].replace(self.alias, self.folder)
        scope["path"] = scope["path"].replace(self.alias.decode(), self.folder.decode())

        async def receive_real() -> dict[str, Any]:
            message = await receive()
            if message.get("type") == "http.request" and message.get("body"):
                message["body"] = message["body"].replace(self.alias, self.folder)
            return message

        async def send_hidden(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.body" and message.get("body"):
                message["body"] = message["body"].replace(self.folder, self.alias)
            await send(message)

        await self.app(scope, receive_real, send_hidden)


def path_alias(folder: str | Path) -> str:
    """A relative name as long as `folder`, naming nothing on the server (see `HidePaths`)."""
    n = len(str(folder))
    return ("medlvr-demo" + "-" * n)[:n]


@dataclass
class Server:
    """A running demo: `close()` stops it and deletes its upload folder and gallery."""

    page: Any
    service: DemoService
    folder: Path  # uploads (Gradio's temporary folder for this server) and the gallery's scans
    _env: str | None = None

    def real_path(self, path: str | Path) -> Path:
        """The server path behind a path the page or the upload API gave (`HidePaths`)."""
        alias = path_alias(self.folder)
        text = str(path)
        return Path(str(self.folder) + text[len(alias) :] if text.startswith(alias) else text)

    def close(self) -> None:
        self.page.close()
        self.cleanup()
        atexit.unregister(self.cleanup)  # the exit hook would otherwise keep the model alive

    def cleanup(self) -> None:
        """Delete every file the server kept (idempotent; also run at interpreter exit)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if os.environ.get("GRADIO_TEMP_DIR") == str(self.folder / "uploads"):
            if self._env is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self._env


def serve(
    vlm: LatentVLM, config: ServeConfig | None = None, *, block: bool = True, quiet: bool = False
) -> Server:
    """Build the page and launch it; with `block=False` returns the running `Server` (`.close()` stops it)."""
    from starlette.middleware import Middleware

    cfg = config or ServeConfig()
    folder = Path(tempfile.mkdtemp(prefix="medlvr-demo-"))
    uploads = folder / "uploads"
    uploads.mkdir()
    # Gradio stores uploads and the images it serves in GRADIO_TEMP_DIR, read when the page is built
    # and launched: a folder of this server's own, so that all of it can be deleted.
    server = Server(
        None, DemoService(vlm, cfg, upload_dir=uploads), folder, os.environ.get("GRADIO_TEMP_DIR")
    )
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    atexit.register(server.cleanup)
    try:
        server.service.make_examples(folder / "examples")
        server.page = page = build_app(server.service)
        page.queue(default_concurrency_limit=1)
        page.launch(
            server_name=cfg.host,
            server_port=cfg.port,
            prevent_thread_lock=not block,
            quiet=quiet,
            theme=theme(),
            css=CSS,
            max_file_size=int(cfg.max_upload_mb * 1e6),  # refused while uploading, not after
            allowed_paths=[str(folder / "examples")],
            ssr_mode=False,
            show_error=False,  # a server exception is a message on the page, never a traceback
            app_kwargs={
                "middleware": [Middleware(HidePaths, folder=str(folder), alias=path_alias(folder))]
            },
            inbrowser=False,
        )
    except BaseException:
        server.cleanup()
        atexit.unregister(server.cleanup)
        raise
    if block:  # launch returned: the server stopped (Ctrl+C)
        server.cleanup()
        atexit.unregister(server.cleanup)
    return server


__all__ = [
    "ServeConfig",
    "DemoService",
    "Result",
    "Example",
    "InputError",
    "Server",
    "parse_options",
    "build_app",
    "serve",
    "without_paths",
]
