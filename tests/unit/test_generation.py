"""Generation backends on the tiny model: the `hf` backend (batching exact, seeded, prefill as training tokenizes
it), the `server` client against serve.py on localhost (n > 1, prefill, concurrency bound, retries, errors)."""

import dataclasses
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from internvl_tune.cli import main
from internvl_tune.data.placeholders import remove_image_placeholders
from internvl_tune.data.prompt import build_inference_prompt
from internvl_tune.data.transform import SampleBuilder, SampleSettings
from internvl_tune.generation.base import GenerationRequest, SamplingParams, generate_all
from internvl_tune.generation.hf import HFBackend
from internvl_tune.generation.serve import parse_chat_request, start_server
from internvl_tune.generation.server import ServerBackend, ServerError, to_openai_messages
from internvl_tune.testing.tiny import build_tiny_model

GREEDY = SamplingParams(n=2, temperature=0, max_new_tokens=6)


@pytest.fixture(scope="module")
def hf_backend():
    model, tokenizer = build_tiny_model(seed=0)
    settings = SampleSettings(
        system_message="You are a helpful assistant.", image_size=56, num_image_token=4, max_dynamic_patch=2
    )
    return HFBackend(model.eval(), tokenizer, settings, batch_size=8)


@pytest.fixture(scope="module")
def hf_server(hf_backend):
    server = start_server(hf_backend, model_name="tiny")
    yield server
    server.shutdown()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def requests_of_every_shape(params: SamplingParams = GREEDY) -> list[GenerationRequest]:
    """Prompts of different lengths: 1 tile, 3 tiles (2x1 grid + thumbnail), two images, none, and a prefill."""
    red, blue = Image.new("RGB", (56, 56), (255, 0, 0)), Image.new("RGB", (112, 56), (0, 0, 255))
    return [
        GenerationRequest(user("<image>\nWhat colour is the shape?"), [red], params),
        GenerationRequest(user("<image>\nHow many shapes are there?"), [blue], params),
        GenerationRequest(user("Image-1: <image>\nImage-2: <image>\nSame?"), [red, blue], params),
        GenerationRequest(user("Hello!"), [], params),
        GenerationRequest(user("Describe the image."), [], params, assistant_prefill="There are two"),
    ]


def test_hf_batched_equals_one_at_a_time(hf_backend):
    requests = requests_of_every_shape()
    batched = hf_backend.generate(requests)
    single = [
        HFBackend(hf_backend.model, hf_backend.tokenizer, hf_backend.settings, batch_size=1).generate([r])[0]
        for r in requests
    ]
    assert batched == single
    assert all(len(texts) == 2 and texts[0] == texts[1] for texts in batched)  # greedy: n copies of one text
    assert len({texts[0] for texts in batched}) > 1  # the prompts differ, and so do the answers


def test_hf_sampling_is_seeded_and_leaves_the_callers_random_state(hf_backend):
    params = SamplingParams(n=4, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6, seed=3)
    requests = requests_of_every_shape(params)[:2]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = hf_backend.generate(requests)
    assert torch.equal(torch.rand(3), expected_next)
    assert hf_backend.generate(requests) == first
    assert len(set(first[0])) > 1  # four draws, not one text four times
    other_seed = [
        GenerationRequest(r.messages, r.images, SamplingParams(**{**vars(params), "seed": 4})) for r in requests
    ]
    assert hf_backend.generate(other_seed) != first


def test_prefill_prompt_is_the_training_sample_up_to_the_prefix(hf_backend):
    """The assistant prefill is tokenized as training tokenizes the answer: the prompt with prefill "The answer is"
    is the start of the training sample whose answer is "The answer is yes."."""
    tokenizer, settings = hf_backend.tokenizer, hf_backend.settings
    prompt = build_inference_prompt(tokenizer, user("Hello!"), [], settings, assistant_prefill="The answer is")
    record = {"conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "The answer is yes."}]}
    sample = SampleBuilder(tokenizer, settings)(record, "test:1", None, rng=None)
    assert sample["input_ids"][: len(prompt.input_ids)].tolist() == prompt.input_ids
    assert tokenizer.decode(sample["input_ids"][len(prompt.input_ids) :]) == " yes.<|im_end|>\n"


def test_openai_messages_put_images_first_and_drop_placeholders():
    request = requests_of_every_shape()[2]
    (message,) = to_openai_messages(request)
    assert [p["type"] for p in message["content"]] == ["image_url", "image_url", "text"]
    assert message["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert message["content"][2]["text"] == "Same?"
    assert remove_image_placeholders("<image>\nHow many?") == "How many?"
    # ... and serve.py puts them back where the hf backend has them
    parsed = parse_chat_request({"messages": to_openai_messages(request)})
    assert parsed.messages == request.messages and len(parsed.images) == 2
    prefill = requests_of_every_shape()[4]
    body = {"messages": to_openai_messages(prefill), "continue_final_message": True}
    assert parse_chat_request(body).assistant_prefill == "There are two"


def test_server_backend_equals_hf_backend(hf_backend, hf_server):
    """Through HTTP and back (images as PNG data URLs, n > 1, prefill via continue_final_message): greedy texts are
    the hf backend's; a seeded sampled request too (one request alone is one batch on both sides)."""
    client = ServerBackend(hf_server.base_url, max_concurrency=3)
    assert client.model_name == "tiny"  # the first model /models lists
    requests = requests_of_every_shape()
    assert client.generate(requests) == hf_backend.generate(requests)
    sampled = requests_of_every_shape(
        SamplingParams(n=3, temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=6, seed=7)
    )
    assert client.generate(sampled[:1]) == hf_backend.generate(sampled[:1])


class SlowEcho:
    """A backend that takes `delay` seconds per call and answers '<prompt text> #k'."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, 0

    def generate(self, requests):
        return generate_all(self, requests)

    def stream(self, requests):
        for index, request in enumerate(requests):
            self.calls += 1
            time.sleep(self.delay)
            yield index, [f"{request.messages[-1]['content']} #{k}" for k in range(request.params.n)]

    def close(self):
        pass


def wait_until(condition, what: str, timeout_s: float = 30.0) -> None:
    """Poll `condition` until it holds; the timeout only turns a hang into a failure, nothing passes by waiting."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class GatedEcho(SlowEcho):
    """SlowEcho whose first call waits until `server` holds `num_in_flight` requests (the client's whole bound)."""

    def __init__(self, num_in_flight: int):
        super().__init__()
        self.num_in_flight, self.server = num_in_flight, None

    def stream(self, requests):
        if not self.calls:
            wait_until(lambda: self.server.in_flight >= self.num_in_flight, "the client's first requests")
        yield from super().stream(requests)


def test_concurrency_bound_is_respected(monkeypatch):
    """The client holds at most 3 requests at once, and the server counts no more, in steps that do not depend on
    timing: the model answers nothing until the server holds the client's first 3 requests (so the most is at least
    3), and each answer's write-back waits until the client's next request has arrived. A server that counted a
    request until its answer was written (the bug) counts that request and the next one together: 4."""
    from internvl_tune.generation import serve

    send = serve._Handler._send
    num_requests = 10

    def send_then_wait_for_the_next_request(self, status, payload):
        seen = self.server.num_requests
        send(self, status, payload)
        self.wfile.flush()
        wait_until(lambda: self.server.num_requests > seen or seen == num_requests, "the client's next request")

    monkeypatch.setattr(serve._Handler, "_send", send_then_wait_for_the_next_request)
    backend = GatedEcho(num_in_flight=3)
    server = start_server(backend, max_batch=1)
    backend.server = server
    try:
        client = ServerBackend(server.base_url, max_concurrency=3)
        requests = [GenerationRequest(user(f"q{i}"), params=SamplingParams(n=2)) for i in range(num_requests)]
        results = client.generate(requests)
        assert results == [[f"q{i} #0", f"q{i} #1"] for i in range(num_requests)]  # in request order
        assert server.num_requests == num_requests
        assert server.max_in_flight == 3
    finally:
        server.shutdown()


def stub_server(statuses: list[int], choices_per_call: int | None = None):
    """A server that answers the k-th POST with statuses[k] (then 200), and at most `choices_per_call` choices; the
    POSTs' bodies are in `posts`, their paths in `server.paths`."""
    posts, paths = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(200, {"data": [{"id": "stub"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posts.append(body)
            paths.append(self.path)
            status = statuses[len(posts) - 1] if len(posts) <= len(statuses) else 200
            if status != 200:
                self._send(status, {"error": {"message": f"stub says {status}"}})
                return
            n = min(body.get("n", 1), choices_per_call or body.get("n", 1))
            choices = [{"index": i, "message": {"content": f"seed {body.get('seed')} #{i}"}} for i in range(n)]
            self._send(200, {"choices": choices})

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.paths = paths
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1", posts


def test_retries_after_503_and_429_then_succeeds():
    server, url, posts = stub_server([503, 429])
    try:
        client = ServerBackend(url, backoff_s=0.01)
        assert client.generate([GenerationRequest(user("q"), params=SamplingParams(n=2, seed=1))]) == [
            ["seed 1 #0", "seed 1 #1"]
        ]
        assert len(posts) == 3
    finally:
        server.shutdown()


def test_a_server_that_ignores_n_is_asked_for_the_rest():
    server, url, posts = stub_server([], choices_per_call=1)
    try:
        texts = ServerBackend(url).generate([GenerationRequest(user("q"), params=SamplingParams(n=3, seed=10))])
        assert texts == [["seed 10 #0", "seed 11 #0", "seed 12 #0"]]  # each call a new seed: new texts
        assert [p["n"] for p in posts] == [3, 2, 1]
    finally:
        server.shutdown()


def test_client_errors_are_not_retried():
    server, url, posts = stub_server([400])
    try:
        with pytest.raises(ServerError, match="HTTP 400: stub says 400"):
            ServerBackend(url, backoff_s=0.01).generate([GenerationRequest(user("q"))])
        assert len(posts) == 1
    finally:
        server.shutdown()


def test_retries_give_up_with_the_servers_message():
    server, url, posts = stub_server([503] * 3)
    try:
        with pytest.raises(ServerError, match="HTTP 503: stub says 503"):
            ServerBackend(url, max_retries=2, backoff_s=0.01).generate([GenerationRequest(user("q"))])
        assert len(posts) == 3
    finally:
        server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_line_error(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError, match="cannot reach the server at"):
        ServerBackend(url)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert main(["sample", str(prompts), "--out", str(tmp_path / "out"), "--backend", "server", "--base-url", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the server at") and "\n" not in err


def test_server_names_a_model_it_does_not_serve(hf_server):
    with pytest.raises(ValueError, match="does not serve 'other'; it serves tiny"):
        ServerBackend(hf_server.base_url, model_name="other")


def test_serve_answers_bad_requests_with_400(hf_server):
    import urllib.error
    import urllib.request

    for body, message in (
        ({"messages": []}, "'messages' must be a non-empty list"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}
                ]
            },
            "base64 data URLs",
        ),
        (
            {"messages": [{"role": "user", "content": "<image>\nq"}]},
            "1 <image> placeholders in the user messages for 0 images",
        ),
        ({"messages": [{"role": "user", "content": "q"}], "top_p": 0}, "0 < top_p <= 1"),
    ):
        request = urllib.request.Request(
            hf_server.base_url + "/chat/completions", data=json.dumps(body).encode(), method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 400 and message in json.loads(e.value.read())["error"]["message"]


def test_serve_command_refuses_a_missing_folder(tmp_path, capsys):
    from internvl_tune.generation.serve import main as serve_main

    assert serve_main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nowhere'}: no such folder"


def test_rollouts_are_the_sampled_token_ids_of_the_generated_texts(hf_backend):
    """`rollout` (online RL) returns what `generate` decodes, as ids: each response ends at its stop token or is
    marked truncated at max_new_tokens; its prompt is the inference prompt (the training tokens up to the answer)."""
    params = SamplingParams(n=3, temperature=1.0, top_k=0, max_new_tokens=6, seed=5)
    requests = requests_of_every_shape(params)
    texts = hf_backend.generate(requests)
    rollouts = hf_backend.rollout(requests)
    assert [[r.text for r in group] for group in rollouts] == texts
    stops = hf_backend.stop_ids
    for group in rollouts:
        assert len(group) == 3
        for r in group:
            assert 1 <= len(r.response_ids) <= 6
            assert r.truncated == (r.response_ids[-1] not in stops)  # it stopped, or ran to max_new_tokens
            assert not r.truncated or len(r.response_ids) == 6
            assert not any(t in stops for t in r.response_ids[:-1])  # nothing after a stop token
        assert len({id(r.prompt) for r in group}) == 1  # one prompt for the group


def test_a_weight_push_reloads_the_servers_folder_and_nothing_else(tmp_path):
    """The server answers with the new weights after `/v1/reload_weights`; a request naming another folder, a
    folder of pickled weights, or without the API key is refused; binding beyond localhost needs a key."""
    import json as json_module
    import urllib.error
    import urllib.request

    from internvl_tune.errors import UserError

    model, tokenizer = build_tiny_model(seed=0)
    folder = tmp_path / "policy"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = SampleSettings(image_size=56, num_image_token=4, max_dynamic_patch=2)
    backend = HFBackend(model.eval(), tokenizer, settings)
    server = start_server(backend, model_name="tiny", api_key="k3y", weights_dir=folder)
    client = ServerBackend(server.base_url, model_name="tiny", api_key="k3y")

    def post(path, body, key="k3y"):
        request = urllib.request.Request(
            server.base_url + path, data=json_module.dumps(body).encode(), headers={"Authorization": f"Bearer {key}"}
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json_module.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json_module.loads(e.read())

    try:
        ask = [GenerationRequest(user("Hello!"), [], GREEDY)]
        before = client.generate(ask)
        other, _ = build_tiny_model(seed=7)  # the trainer's update: new weights saved into the server's folder
        other.save_pretrained(folder)
        expected = HFBackend(other.eval(), tokenizer, settings).generate(ask)
        assert expected != before
        assert post("/reload_weights", {})[0] == 200
        assert client.generate(ask) == expected
        assert post("/reload_weights", {"path": str(tmp_path)})[0] == 400  # another folder
        assert post("/reload_weights", {}, key="wrong")[0] == 401
        pickled = tmp_path / "pickled"
        pickled.mkdir()
        (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
        server2 = start_server(backend, model_name="tiny", weights_dir=pickled)
        try:
            request = urllib.request.Request(server2.base_url + "/reload_weights", data=b"{}")
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(request)
            assert error.value.code == 400 and b"pickled weights are never loaded" in error.value.read()
        finally:
            server2.shutdown()
    finally:
        server.shutdown()
    with pytest.raises(UserError, match="needs --api-key"):
        start_server(backend, host="0.0.0.0")


def test_server_rollouts_are_the_hf_backends_rollouts(hf_backend, hf_server):
    """Online RL through a server: the sampled token ids come back (`return_token_ids`), the prompts are built here
    with training's tile budget sent along (`mm_processor_kwargs`), and the ids, texts and cut flags equal the
    in-process rollouts of the same seeded requests (one request per batch on both sides). Responses cut at
    max_tokens are answered `finish_reason: length`."""
    from internvl_tune.generation.rollouts import ServerRollouts

    params = SamplingParams(n=3, temperature=1.0, top_k=0, max_new_tokens=4, seed=11)
    requests = requests_of_every_shape(params)[:4]
    local = HFBackend(hf_backend.model, hf_backend.tokenizer, hf_backend.settings, batch_size=3)
    expected = local.rollout(requests)
    client = ServerBackend(hf_server.base_url, max_concurrency=1)
    got = ServerRollouts(client, hf_backend.tokenizer, hf_backend.settings).rollout(requests)
    for mine, theirs in zip(got, expected, strict=True):
        assert [r.response_ids for r in mine] == [r.response_ids for r in theirs]
        assert [r.text for r in mine] == [r.text for r in theirs]
        assert [r.truncated for r in mine] == [r.truncated for r in theirs]
        assert mine[0].prompt.input_ids == theirs[0].prompt.input_ids
        tiles = mine[0].prompt.pixel_values, theirs[0].prompt.pixel_values
        assert (tiles[0] is None and tiles[1] is None) or torch.equal(*tiles)
    assert any(r.truncated for group in got for r in group)  # 4 new tokens: some responses were cut
    # The server's log-probs of its samples (serve.py scores them as the trainer does), one per sampled token.
    for mine, theirs in zip(got, expected, strict=True):
        assert [len(r.sampler_logps) for r in mine] == [len(r.response_ids) for r in mine]
        for lp, ref in zip([r.sampler_logps for r in mine], local.score(theirs), strict=True):
            assert lp == pytest.approx(ref, abs=1e-5) and all(v <= 0 for v in lp)
    sampled = client.sample_ids(requests[0])
    assert sampled.finish_reasons == ["length" if r.truncated else "stop" for r in expected[0]]


def test_the_tile_budget_travels_with_the_request(hf_backend, hf_server):
    """A server tiles with the budget the request names, not its own: one tile per image gives a shorter prompt,
    and the server's prompt ids equal those built with that budget here."""
    blue = Image.new("RGB", (112, 56), (0, 0, 255))
    request = GenerationRequest(user("<image>\nHow many?"), [blue], GREEDY)
    client = ServerBackend(hf_server.base_url)
    default = client.sample_ids(request).prompt_ids
    one_tile = client.sample_ids(GenerationRequest(user("<image>\nHow many?"), [blue], GREEDY, tiles_per_image=1))
    assert len(one_tile.prompt_ids) == len(default) - 2 * hf_backend.settings.num_image_token  # 3 tiles -> 1
    settings = dataclasses.replace(hf_backend.settings, max_dynamic_patch=1)
    expected = build_inference_prompt(hf_backend.tokenizer, request.messages, [blue], settings).input_ids
    assert one_tile.prompt_ids == expected


def test_a_server_with_another_prompt_is_refused_in_one_line(hf_backend, hf_server):
    """The trainer's prompt (another system message here) differs from the one the server sampled from: refused,
    naming the first differing tokens, never trained on."""
    from dataclasses import replace

    from internvl_tune.generation.rollouts import PromptMismatch, ServerRollouts

    other = replace(hf_backend.settings, system_message="You are a pirate.")
    rollouts = ServerRollouts(ServerBackend(hf_server.base_url), hf_backend.tokenizer, other)
    with pytest.raises(PromptMismatch, match="the server built another prompt than training does") as error:
        rollouts.rollout(requests_of_every_shape()[3:4])
    assert error.value.index == 0 and "\n" not in str(error.value)


def test_a_server_without_token_ids_is_a_clear_error():
    """The stub answers texts only: online RL cannot train on a re-tokenised text, so it stops with what to do."""
    server, url, _ = stub_server([])
    try:
        with pytest.raises(ServerError, match="returned no token ids"):
            ServerBackend(url).sample_ids(GenerationRequest(user("Hi"), [], GREEDY))
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("kind", "path", "body"),
    [
        ("internvl-tune", "/v1/reload_weights", "path"),
        ("vllm", "/collective_rpc", {"method": "reload_weights"}),
        ("sglang", "/update_weights_from_disk", "model_path"),
    ],
)
def test_each_server_kind_is_asked_to_reload_at_its_endpoint(tmp_path, kind, path, body):
    """The push's reload call per server (docs/rl.md): serve.py's, vLLM's collective_rpc (at the root, not under
    /v1) and SGLang's update_weights_from_disk, the folder named where the server takes one."""
    server, url, posts = stub_server([])
    try:
        ServerBackend(url).reload_weights(tmp_path, kind=kind)
    finally:
        server.shutdown()
    expected = body if isinstance(body, dict) else {body: str(tmp_path.resolve())}
    assert list(zip(server.paths, posts, strict=True)) == [(path, expected)]
