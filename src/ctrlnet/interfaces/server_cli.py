"""``ctrlnet ui`` (the Gradio web app) and ``ctrlnet serve`` (the HTTP API): both load models once
and hand them to a long-running server."""

from __future__ import annotations

import argparse
import os
import sys

TOKEN_ENV = "CTRLNET_API_TOKEN"


def add_ui_parser(sub) -> None:
    from ctrlnet.interfaces.model_args import add_model_args

    p = sub.add_parser(
        "ui", help="open the web app (needs: pip install 'ctrlnet[ui]')",
        description="Start the web app: txt2img, img2img and inpaint tabs with ControlNet units (preprocessor "
                    "preview, control and resize modes, start/end), samplers and schedules, hires fix, batch "
                    "runs with Interrupt, PNG info, line-art and reference colorization. Open the printed "
                    "address in a browser. Models can be switched in the app from --models-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = reachable from other machines)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--models-dir", default=None,
                   help="folder of base models and ControlNets offered in the app's model menus")
    p.add_argument("--outputs", default="outputs", help="folder where generated PNGs are kept")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link (needs internet)")
    p.add_argument("--units", type=int, default=3, help="ControlNet units per tab (1-10)")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="require a login: FILE holds user:password lines (for a shared server)")
    add_model_args(p)
    p.set_defaults(func=_cmd_ui)


def add_serve_parser(sub) -> None:
    from ctrlnet.interfaces.limits import Limits
    from ctrlnet.interfaces.model_args import add_model_args

    d = Limits()
    p = sub.add_parser(
        "serve", help="run the HTTP API (needs: pip install 'ctrlnet[serve]')",
        description="Serve the jobs API (POST /v1/jobs, GET/DELETE /v1/jobs/{id}, GET /v1/jobs/{id}/events), "
                    "POST /v1/generate, POST /v1/annotate, GET /v1/models and GET /health, and AUTOMATIC1111's "
                    "API with sd-webui-controlnet (/sdapi/v1/txt2img, img2img, progress, interrupt...; "
                    "/controlnet/detect, model_list...) for existing A1111 clients; the API is described at "
                    "/docs (works offline). One generation runs at a time; extra requests wait in a short "
                    f"queue and get 429 with Retry-After when it is full. Set {TOKEN_ENV} (or --token-file) to "
                    "require 'Authorization: Bearer <token>' (A1111 clients: HTTP Basic with the token as the "
                    "password).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--token-file", default=None, help=f"file holding the bearer token (default: ${TOKEN_ENV}; "
                                                       "neither: no token is required)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="jobs running + waiting before 429")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest input image (pixels)")
    p.add_argument("--max-resolution", type=int, default=d.max_resolution,
                   help="largest resolution / width / height a request may ask for (px)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="sampling steps per request (all passes)")
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    p.add_argument("--max-output-pixels", type=int, default=d.max_output_pixels,
                   help="output pixels per request: width x height x images (x hires scale squared)")
    p.add_argument("--max-controls", type=int, default=d.max_controls, help="ControlNet units per request")
    p.add_argument("--keep-s", type=float, default=d.keep_s,
                   help="seconds a finished job's result stays readable at GET /v1/jobs/{id}")
    p.add_argument("--keep-count", type=int, default=d.keep_count, help="finished jobs kept at most")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request on stderr: method, route, status, seconds (no bodies or queries)")
    add_model_args(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_ui(args) -> int:
    from ctrlnet.interfaces.model_args import load_from_args

    try:
        from ctrlnet.interfaces import webui
    except ImportError as e:
        print(f"ctrlnet ui needs Gradio: pip install 'ctrlnet[ui]' ({e})", file=sys.stderr)
        return 1
    if args.auth_file:
        webui.read_auth_file(args.auth_file)  # a bad file is refused before the models load
    loaded = load_from_args(args)
    app = webui.build_app(loaded, models_dir=args.models_dir, outputs_dir=args.outputs,
                          device=args.device, dtype=args.dtype, units=args.units)
    webui.launch(app, args.host, args.port, share=args.share, auth_file=args.auth_file, outputs_dir=args.outputs)
    return 0


def _cmd_serve(args) -> int:
    from ctrlnet.interfaces.model_args import load_from_args

    try:
        import uvicorn

        from ctrlnet.interfaces.api import create_app
        from ctrlnet.interfaces.limits import Limits
    except ImportError as e:
        print(f"ctrlnet serve needs FastAPI and uvicorn: pip install 'ctrlnet[serve]' ({e})", file=sys.stderr)
        return 1
    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV]
    if token is not None and len(token) < 16:
        raise ValueError("the bearer token must be at least 16 characters")
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                    max_resolution=args.max_resolution, max_steps=args.max_steps, max_images=args.max_images,
                    max_queue=args.max_queue, max_output_pixels=args.max_output_pixels,
                    max_controls=args.max_controls, keep_s=args.keep_s, keep_count=args.keep_count)
    app = create_app(load_from_args(args), limits, token=token)
    print(f"ctrlnet API on http://{args.host}:{args.port}  (docs: /docs; auth: {'bearer token' if token else 'none'})",
          file=sys.stderr, flush=True)
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    access = logging.getLogger("ctrlnet.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO if args.access_log else logging.WARNING)
    # uvicorn's own access log prints query strings; ours prints the route template only
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
