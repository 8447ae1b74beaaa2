"""The HTTP service's jobs API, docs, OpenAPI document, errors and load behaviour, on tiny random
models: in-process (TestClient) where the app is enough, a real uvicorn on 127.0.0.1 where the
network matters (client disconnects, 50 concurrent clients, resident memory)."""

import base64
import io
import json
import logging
import math
import re
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
pytest.importorskip("fastapi_offline")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from ctrlnet.interfaces.api import create_app  # noqa: E402
from ctrlnet.interfaces.api.jobs import CANCELLED, DONE, JobExpired, JobNotFound, JobQueue, QueueFull  # noqa: E402
from ctrlnet.interfaces.limits import Limits  # noqa: E402
from serve_process import serve_process  # noqa: E402

TOKEN = "jobs-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG = 400  # steps of a job that is cancelled long before it ends


@pytest.fixture(scope="module")
def models():
    from ctrlnet.pipeline import load_models

    return load_models("random:tiny-sd1", ["random:edges"], device="cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the shared 2-core machine: one thread is several times faster here


@pytest.fixture
def make_client(models):
    """TestClients over fresh apps; their job queues are shut down after the test (no stray work)."""
    apps = []

    def make(**limits):
        lim = Limits(**{"max_steps": LONG, "max_resolution": 128, "max_images": 2, "max_queue": 4, **limits})
        apps.append(create_app(models, lim, token=TOKEN))
        return TestClient(apps[-1])

    yield make
    for app in apps:
        app.state.queue.shutdown()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _b64png(img: np.ndarray) -> str:
    return base64.b64encode(_png(img)).decode()


def _picture(h=80, w=96) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[20:60, 30:70] = (250, 250, 250)
    img[35:45, 10:90] = (30, 120, 240)
    return img


def _body(**over):
    body = {"prompt": "a box", "steps": 2, "resolution": 64, "seed": 5,
            "controls": [{"image": _b64png(_picture()), "annotator": "canny", "annotator_params": {"low_threshold": 50}}]}
    body.update(over)
    return body


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _wait(client, job_id, until=lambda s: s["state"] in ("done", "failed", "cancelled"), timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        s = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
        if until(s):
            return s
        assert time.monotonic() < deadline, f"job stuck: {s}"
        time.sleep(0.01)


# ---- the queue on its own (a fake clock: the pace arithmetic exactly) ---------------------------

def test_queue_measures_its_pace_and_derives_retry_after_and_eta():
    now = [0.0]
    q = JobQueue(capacity=3, keep_s=100, keep_count=10, clock=lambda: now[0])
    assert q.seconds_per_step() == 1.0  # the prior, before anything ran

    def timed(steps, seconds_per_step):
        def fn(progress, cancel):
            for i in range(steps):
                now[0] += seconds_per_step
                progress(i + 1, steps)
        return fn

    a = q.submit(timed(3, 2.0), 3)
    assert a.done_event.wait(10) and a.state == DONE
    assert q.seconds_per_step() == pytest.approx(2.0)
    b = q.submit(timed(1, 4.0), 1)
    assert b.done_event.wait(10)
    assert q.seconds_per_step() == pytest.approx((6 + 4) / 4)  # mean over the finished steps: 2.5

    gate, started = threading.Event(), threading.Event()

    def blocked(progress, cancel):
        now[0] += 2.5
        progress(1, 5)
        started.set()
        gate.wait(10)
        return "late"

    run = q.submit(blocked, 5)
    w1, w2 = q.submit(timed(4, 1.0), 4), q.submit(timed(2, 1.0), 2)
    assert started.wait(10)
    assert q.position(run) == 0 and q.position(w1) == 1 and q.position(w2) == 2 and q.current() is run
    with pytest.raises(QueueFull) as e:
        q.submit(timed(1, 1.0), 1)
    assert e.value.retry_after_s == math.ceil(4 * 2.5)  # the running job's 4 steps left at 2.5 s/step
    assert run.eta_s == pytest.approx(4 * 2.5)
    assert w1.eta_s == pytest.approx((4 + 4) * 2.5) and w2.eta_s == pytest.approx((4 + 4 + 2) * 2.5)
    q.cancel(w1.id)  # a waiting job never starts
    assert w1.state == CANCELLED and q.position(w2) == 1 and w2.eta_s == pytest.approx((4 + 2) * 2.5)
    gate.set()
    assert w2.done_event.wait(10) and w2.state == DONE and run.result == "late"

    # from its second step on, a running job is timed by its own pace (after its first step, which
    # also carried the setup), whatever earlier jobs of other sizes measured
    gate2, at3 = threading.Event(), threading.Event()

    def own_pace(progress, cancel):
        now[0] += 30.0  # setup and the first step
        progress(1, 10)
        for i in (2, 3):
            now[0] += 0.5
            progress(i, 10)
        at3.set()
        gate2.wait(10)
        return "ok"

    mine = q.submit(own_pace, 10)
    after = q.submit(timed(2, 1.0), 2)
    assert at3.wait(10)
    assert mine.eta_s == pytest.approx(7 * 0.5) and q.retry_after_s() == math.ceil(7 * 0.5)
    assert after.eta_s == pytest.approx(7 * 0.5 + 2 * q.seconds_per_step())
    gate2.set()
    assert after.done_event.wait(10) and mine.result == "ok"
    assert w1.started_at is None
    q.shutdown()


def test_queue_keeps_results_a_bounded_time_and_count():
    now = [0.0]
    q = JobQueue(capacity=2, keep_s=10, keep_count=2, clock=lambda: now[0])
    jobs = []
    for i in range(3):
        jobs.append(q.submit(lambda progress, cancel, i=i: i, 1))
        assert jobs[-1].done_event.wait(10)
    with pytest.raises(JobExpired, match="keeps 2"):
        q.get(jobs[0].id)  # pushed out by newer results
    assert q.get(jobs[2].id).result == 2
    now[0] += 10.5
    with pytest.raises(JobExpired, match="more than 10 s ago"):
        q.get(jobs[2].id)
    with pytest.raises(JobNotFound):
        q.get("0" * 32)
    q.shutdown()


# ---- jobs over HTTP (in-process) ----------------------------------------------------------------

def test_submit_poll_progress_and_result(make_client):
    c = make_client()
    r = c.post("/v1/jobs", json=_body(steps=12, num_images=2), headers=AUTH)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["position"] in (0, 1) and len(job["id"]) == 32
    seen = []
    s = _wait(c, job["id"], until=lambda s: seen.append((s["state"], s["step"], s["eta_s"])) or s["state"] == "done")
    steps = [st for state, st, _ in seen if state == "running"]
    assert all(eta > 0 for state, st, eta in seen if state == "running" and st < 12)
    assert len(set(steps)) >= 2 and steps == sorted(steps)  # progress was visible and only went up
    assert s["step"] == s["total"] == 12 and s["position"] is None and s["eta_s"] == 0
    res = s["result"]
    assert res["seeds"] == [5, 6] and len(res["images"]) == 2
    for k, b in enumerate(res["images"]):
        info = Image.open(io.BytesIO(base64.b64decode(b))).info
        assert f"Seed: {5 + k}" in info["parameters"] and info["parameters"] == res["infotexts"][k]
        assert json.loads(info["ctrlnet"])["request"]["seed"] == 5 + k
    assert res["request"]["seed"] == 5 and res["request"]["controls"][0]["image"]
    listed = c.get("/v1/jobs", headers=AUTH).json()
    assert [j["id"] for j in listed] == [job["id"]] and listed[0]["result"] is None


def test_cancel_mid_run_frees_the_worker_within_one_step(make_client):
    c = make_client()
    long = c.post("/v1/jobs", json=_body(steps=LONG, controls=[]), headers=AUTH).json()
    nxt = c.post("/v1/jobs", json=_body(steps=3, controls=[]), headers=AUTH).json()
    assert c.get(f"/v1/jobs/{nxt['id']}", headers=AUTH).json()["position"] == 1
    _wait(c, long["id"], until=lambda s: s["step"] >= 3)
    at_cancel = c.delete(f"/v1/jobs/{long['id']}", headers=AUTH).json()
    final = _wait(c, long["id"])
    after = _wait(c, nxt["id"])
    assert final["state"] == "cancelled" and final["result"] is None
    assert final["step"] - at_cancel["step"] <= 1, (at_cancel["step"], final["step"])  # stopped at its next step
    assert final["step"] < LONG
    assert after["state"] == "done" and after["step"] == 3 and after["started"] >= final["finished"]
    # a finished job is left as it is; a cancelled queued job never starts
    assert c.delete(f"/v1/jobs/{nxt['id']}", headers=AUTH).json()["state"] == "done"
    a = c.post("/v1/jobs", json=_body(steps=LONG, controls=[]), headers=AUTH).json()
    b = c.post("/v1/jobs", json=_body(steps=2, controls=[]), headers=AUTH).json()
    assert c.delete(f"/v1/jobs/{b['id']}", headers=AUTH).json()["state"] == "cancelled"
    c.delete(f"/v1/jobs/{a['id']}", headers=AUTH)
    assert _wait(c, a["id"])["state"] == "cancelled"
    b = c.get(f"/v1/jobs/{b['id']}", headers=AUTH).json()
    assert b["started"] is None and b["step"] == 0
    print(f"\ncancel: step {at_cancel['step']} when DELETE answered, stopped at step {final['step']}")


def test_events_stream_in_order_and_end_with_the_final_state(make_client):
    c = make_client()
    job = c.post("/v1/jobs", json=_body(steps=6), headers=AUTH).json()
    events = []
    with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers=AUTH) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.split(":", 1)[1])))
    names = [n for n, _ in events]
    assert names[-1] == "done" and all(n in ("queued", "running") for n in names[:-1])
    assert all(n == d["state"] for n, d in events)
    steps = [d["step"] for _, d in events]
    assert steps == sorted(steps) and steps[-1] == 6 and len(set(steps)) >= 3
    assert events[-1][1]["id"] == job["id"]
    # a finished job's stream is its final state alone
    with c.stream("GET", f"/v1/jobs/{job['id']}/events", headers=AUTH) as r:
        data = [json.loads(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:")]
    assert [d["state"] for d in data] == ["done"]


def test_results_expire(make_client):
    c = make_client(keep_s=0.5, keep_count=8)
    job = c.post("/v1/jobs", json=_body(steps=1), headers=AUTH).json()
    assert _wait(c, job["id"])["state"] == "done"
    time.sleep(0.6)
    r = c.get(f"/v1/jobs/{job['id']}", headers=AUTH)
    assert r.status_code == 410 and "result is gone" in r.json()["detail"]
    r = c.get("/v1/jobs/" + "f" * 32, headers=AUTH)
    assert r.status_code == 404 and "no job" in r.json()["detail"]
    c = make_client(keep_count=1)
    ids = [c.post("/v1/jobs", json=_body(steps=1, seed=i), headers=AUTH).json()["id"] for i in range(2)]
    _wait(c, ids[1])
    assert c.get(f"/v1/jobs/{ids[0]}", headers=AUTH).status_code == 410
    assert c.get(f"/v1/jobs/{ids[1]}", headers=AUTH).status_code == 200


def test_job_image_equals_generate_and_the_returned_request_makes_it_again(make_client):
    c = make_client()
    body = _body(steps=3, seed=11, sampler="Euler a", controls=[
        {"image": _b64png(_picture()), "annotator": "canny", "control_mode": "prompt", "start": 0.0, "end": 0.7}])
    sync = c.post("/v1/generate", json=body, headers=AUTH)
    assert sync.status_code == 200, sync.text
    job = c.post("/v1/jobs", json=body, headers=AUTH).json()
    res = _wait(c, job["id"])["result"]
    assert np.array_equal(_pixels(sync.json()["images"][0]), _pixels(res["images"][0]))
    again = c.post("/v1/generate", json=res["request"], headers=AUTH)
    assert again.status_code == 200, again.text
    assert np.array_equal(_pixels(again.json()["images"][0]), _pixels(res["images"][0]))

    # img2img + inpaint + a unit using the init image, explicit size: the record is postable too
    init = _picture(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    body = {"prompt": "x", "steps": 4, "seed": -1, "width": 64, "height": 64, "init_image": _b64png(init),
            "mask": _b64png(mask), "denoising_strength": 0.6, "inpaint_fill": "latent_noise", "mask_blur": 2,
            "controls": [{"annotator": "canny", "resize_mode": "just_resize", "pixel_perfect": True}]}
    first = c.post("/v1/generate", json=body, headers=AUTH)
    assert first.status_code == 200, first.text
    rec = first.json()["request"]
    assert rec["seed"] == first.json()["seed"] >= 0 and rec["init_image"] and rec["mask"]
    assert "image" not in rec["controls"][0]  # the unit used the init image, and still does
    again = c.post("/v1/generate", json=rec, headers=AUTH)
    assert again.status_code == 200, again.text
    a, b = _pixels(first.json()["images"][0]), _pixels(again.json()["images"][0])
    assert np.array_equal(a, b)
    # the same as multipart, the images as files
    fields = {k: v for k, v in rec.items() if k not in ("init_image", "mask")}
    r = c.post("/v1/jobs", data={"request": json.dumps(fields)}, headers=AUTH,
               files={"init_image": ("i.png", _png(init), "image/png"), "mask": ("m.png", _png(mask), "image/png")})
    assert r.status_code == 202, r.text
    assert np.array_equal(_pixels(_wait(c, r.json()["id"])["result"]["images"][0]), a)


def test_output_pixel_bound_is_checked_before_work(make_client):
    c = make_client(max_output_pixels=2 * 64 * 64)
    ok = c.post("/v1/generate", json=_body(steps=1, num_images=2, controls=[], width=64, height=64), headers=AUTH)
    assert ok.status_code == 200, ok.text
    for over in ({"num_images": 2, "hires_scale": 1.5}, {"width": 128, "height": 72}):
        r = c.post("/v1/jobs", json=_body(**{"steps": 1, "controls": [], "width": 64, "height": 64, **over}),
                   headers=AUTH)
        assert r.status_code == 422 and "pixels" in r.json()["detail"], r.text
    assert len(c.get("/v1/jobs", headers=AUTH).json()) == 1  # nothing was queued for the refused ones


def test_no_server_path_in_error_bodies(make_client, models, tmp_path, monkeypatch):
    weights = tmp_path / "secret_weights_folder"
    weights.mkdir()
    monkeypatch.setenv("CTRLNET_ANNOTATOR_DIR", str(weights))
    models.lora_dirs = [tmp_path / "secret_lora_folder"]
    try:
        c = make_client()
        body = _body(controls=[{"image": _b64png(_picture()), "annotator": "hed"}])
        r = c.post("/v1/generate", json=body, headers=AUTH)
        assert r.status_code == 503, r.text
        assert "secret" not in r.text and str(tmp_path) not in r.text and "ControlNetHED.pth" in r.text and "GET /v1/models" in r.text
        job = c.post("/v1/jobs", json=body, headers=AUTH).json()
        s = _wait(c, job["id"])
        assert s["state"] == "failed" and s["error_status"] == 503 and "secret" not in s["error"]
        r = c.post("/v1/annotate", json={"image": _b64png(_picture()), "annotator": "hed"}, headers=AUTH)
        assert r.status_code == 503 and "secret" not in r.text
        r = c.post("/v1/generate", json=_body(loras=[["nope", 1.0]]), headers=AUTH)
        assert r.status_code == 422 and "nope" in r.text and "secret" not in r.text, r.text
    finally:
        models.lora_dirs = []


def test_access_log_has_one_line_per_request_without_queries(make_client, caplog):
    c = make_client()
    with caplog.at_level(logging.INFO, logger="ctrlnet.access"):
        c.get("/v1/jobs/" + "a" * 32 + "?token=hunter2", headers=AUTH)
        c.get("/health")
        c.post("/v1/generate", content=b"{" + b" " * 64, headers={**AUTH, "content-type": "application/json"})
    lines = [r.getMessage() for r in caplog.records if r.name == "ctrlnet.access"]
    assert len(lines) == 3, lines
    assert re.fullmatch(r"GET /v1/jobs/\{job_id\} 404 \d+\.\d{3}s", lines[0])
    assert re.fullmatch(r"GET /health 200 \d+\.\d{3}s", lines[1])
    assert re.fullmatch(r"POST /v1/generate 400 \d+\.\d{3}s", lines[2])
    assert "hunter2" not in caplog.text


# ---- docs and the OpenAPI document ---------------------------------------------------------------

def test_docs_work_offline(make_client):
    c = make_client()
    html = c.get("/docs").text
    assert "swagger-ui" in html.lower()
    assert not re.findall(r"https?://", html), re.findall(r"https?://\S+", html)
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
    for a in assets:
        r = c.get(a)
        assert r.status_code == 200 and len(r.content) > 100, a
    assert c.get("/redoc").status_code == 200


def test_openapi_declares_auth_errors_bounds_and_enums(make_client):
    from ctrlnet.annotators import list_annotators
    from ctrlnet.interfaces.request_io import _CONTROL_FIELDS, _REQUEST_FIELDS, _SERVER_ONLY

    c = make_client(max_output_pixels=123456)
    spec = c.get("/openapi.json").json()
    scheme = spec["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if path.startswith(("/v1/", "/sdapi/", "/controlnet/")):  # the API routes, A1111's included
                assert op.get("security") == [{"bearer": []}], (path, method)
                assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorBody"}
            else:
                assert "security" not in op
    gen = spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"202", "400", "413", "422", "429"} <= set(gen) and "Retry-After" in gen["429"]["headers"]
    assert {"503", "409"} <= set(spec["paths"]["/v1/generate"]["post"]["responses"])
    schemas = spec["components"]["schemas"]
    g, u = schemas["GenerateBody"]["properties"], schemas["ControlBody"]["properties"]
    branch = lambda p: next((b for b in p.get("anyOf", [p]) if b.get("type") != "null"), p)  # noqa: E731
    assert branch(g["steps"])["maximum"] == LONG and branch(g["resolution"])["maximum"] == 128
    assert branch(g["width"])["multipleOf"] == 8 and g["num_images"]["maximum"] == 2
    assert branch(g["max_pixels"])["maximum"] == 123456
    assert {"ddim", "Euler a", "DPM++ 2M Karras", "UniPC"} <= set(branch(g["sampler"])["enum"]) and branch(g["preset"])["enum"] == ["fast"]
    assert {"karras", "Karras", "Automatic"} <= set(branch(g["schedule"])["enum"])
    assert branch(u["annotator"])["enum"] == list_annotators()
    assert branch(u["model"])["enum"] == ["edges"]
    assert u["control_mode"]["enum"] == ["balanced", "prompt", "controlnet"]
    assert u["resize_mode"]["enum"] == ["just_resize", "crop_and_resize", "resize_and_fill"]
    # the documented body is what request_io accepts (plus the image slots, and the preset that
    # with_model_defaults expands), so neither drifts
    assert set(g) == (set(_REQUEST_FIELDS) - _SERVER_ONLY) | {"init_image", "mask", "preset"}
    assert set(u) == set(_CONTROL_FIELDS) | {"image"}


def test_openapi_without_a_token_has_no_security(models):
    app = create_app(models, Limits())
    spec = TestClient(app).get("/openapi.json").json()
    app.state.queue.shutdown()
    assert "securitySchemes" not in spec["components"]
    assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())


def test_an_a1111_module_with_router_for_is_mounted_over_the_shared_context(models, monkeypatch):
    import importlib.machinery
    import importlib.util
    import types

    from fastapi import APIRouter, Depends

    seen = {}

    def router_for(ctx):
        seen["ctx"] = ctx
        r = APIRouter(dependencies=[Depends(ctx.auth)])

        @r.get("/sdapi/v1/progress")
        def progress():
            job = ctx.queue.current()
            return {"state": None if job is None else job.state, "capacity": ctx.queue.capacity}

        return r

    fake = types.ModuleType("ctrlnet.interfaces.api.a1111")
    fake.__spec__ = importlib.machinery.ModuleSpec(fake.__name__, loader=None)
    fake.router_for = router_for
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    app = create_app(models, Limits(max_queue=3), token=TOKEN)
    c = TestClient(app)
    assert app.state.a1111 and seen["ctx"] is app.state.ctx and seen["ctx"].queue is app.state.queue
    assert seen["ctx"].nets_label == {"edges": "edges"} and seen["ctx"].dtype_label == "float32"
    assert c.get("/sdapi/v1/progress").status_code == 401
    assert c.get("/sdapi/v1/progress", headers=AUTH).json() == {"state": None, "capacity": 3}
    op = c.get("/openapi.json").json()["paths"]["/sdapi/v1/progress"]["get"]
    assert op["security"] == [{"bearer": []}]
    app.state.queue.shutdown()
    monkeypatch.delitem(sys.modules, fake.__name__)
    plain = create_app(models, Limits())
    if importlib.util.find_spec(fake.__name__) is None:
        assert not plain.state.a1111  # no such module: nothing mounted
    plain.state.queue.shutdown()


def test_schemathesis_finds_no_server_errors_or_schema_violations(models):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                   response_schema_conformance, status_code_conformance)

    # small bounds so the cases that pass validation run in a few steps on the tiny model
    lim = Limits(max_steps=2, max_resolution=64, max_images=1, max_controls=1, max_output_pixels=64 * 64 * 2,
                 max_queue=2, max_body_bytes=256 * 1024)
    app = create_app(models, lim, token=TOKEN)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_headers_conformance, response_schema_conformance]
    counts, statuses, per_op = {}, {}, {}

    def drive(label, strategy, n):
        @given(case=strategy)
        @settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):
            response = case.call(headers=AUTH)
            counts[label] = counts.get(label, 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            per_op.setdefault(label, []).append(response.status_code)
            case.validate_response(response, checks=checks)

        run()

    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        for strategy in schema.get_strategies_from_examples(op):  # the documented examples, as they are
            drive(label, strategy, 3)
        drive(label, op.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE), 8)
        try:
            drive(label, op.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE), 8)
        except Unsatisfiable:  # nothing to make invalid (GET /health has no inputs)
            assert not op.path.startswith("/v1/"), label
    app.state.queue.shutdown()
    print(f"\nschemathesis: {sum(counts.values())} cases over {len(counts)} operations; statuses {statuses}")
    for label, codes in per_op.items():
        print(f"  {label}: {sorted(codes)}")
    assert len(counts) >= 9 and not any(s >= 500 for s in statuses)
    assert 200 in per_op["POST /v1/annotate"] and 202 in per_op["POST /v1/jobs"]  # cases that did work
    assert per_op["POST /v1/generate"].count(200) >= 3


# ---- a real server on 127.0.0.1 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with serve_process(["--max-queue", "4", "--max-steps", str(LONG), "--max-resolution", "128", "--max-images", "1",
                        "--keep-count", "16", "--no-access-log"], token=TOKEN) as got:
        yield got


def test_a_synchronous_client_that_disconnects_stops_its_job(server):
    url, proc = server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/generate", json=_body(steps=LONG, controls=[], seed=77), headers=AUTH, timeout=1.5)
    deadline = time.monotonic() + 60
    while True:
        jobs = [j for j in httpx.get(url + "/v1/jobs", headers=AUTH).json() if j["total"] == LONG]
        if jobs and jobs[-1]["state"] in ("done", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.05)
    assert jobs[-1]["state"] == "cancelled" and jobs[-1]["step"] < LONG, jobs[-1]
    print(f"\ndisconnect: the job stopped at step {jobs[-1]['step']} of {LONG}")
    assert httpx.get(url + "/health").json()["queue"] == 0


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1])


def test_fifty_concurrent_clients_get_200_or_429_and_memory_stays_flat(server):
    url, proc = server
    results, lock = [], threading.Lock()

    def client(n_requests, seed):
        with httpx.Client(timeout=60) as h:
            for i in range(n_requests):
                try:
                    r = h.post(url + "/v1/generate", json=_body(steps=1, seed=seed * 10 + i), headers=AUTH)
                    item = (r.status_code, r.headers.get("retry-after"), len(r.json().get("images", [])))
                except httpx.HTTPError as e:  # a hang (client timeout) or a dropped connection
                    item = (type(e).__name__, None, 0)
                with lock:
                    results.append(item)

    def wave(counts):
        threads = [threading.Thread(target=client, args=(n, s)) for s, n in enumerate(counts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a client hung"

    wave([1] * 20)
    rss_20 = _rss_kib(proc.pid)
    wave([4] * 30 + [3] * 20)  # 50 concurrent clients, 180 more requests
    assert len(results) == 200
    rss_200 = _rss_kib(proc.pid)
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 4 and codes.count(429) >= 1
    assert all(n == 1 for c, _, n in results if c == 200)
    assert all(ra is not None and int(ra) >= 1 for c, ra, _ in results if c == 429)
    print(f"\n200 requests: {codes.count(200)} x 200, {codes.count(429)} x 429; "
          f"RSS {rss_20 / 1024:.1f} MiB after 20, {rss_200 / 1024:.1f} MiB after 200")
    assert rss_200 <= 1.10 * rss_20, (rss_20, rss_200)
    assert proc.poll() is None and httpx.get(url + "/health").json()["queue"] == 0
