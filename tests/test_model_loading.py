"""Loading the model stack from the official layout, the encode helpers, and the model sources."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_job.api import S3Access
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel
from longcat_trainer.model.encode import (
    decode_latents,
    denormalize_latents,
    encode_prompts,
    encode_video_latents,
    normalize_latents,
)
from longcat_trainer.model.loading import CheckpointError, load_dit, load_stack, load_vae, safetensors_files
from longcat_trainer.model.sources import ModelSource, ModelSourceError, resolve_model_source

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path):
    return load_stack(tiny_checkpoint, dtype=torch.float32)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_stack_loads_every_part_with_the_saved_weights(tiny_checkpoint: Path):
    stack = load_stack(tiny_checkpoint, dtype=torch.bfloat16)
    files = safetensors_files(tiny_checkpoint / "dit")
    assert len(files) > 1, "the fixture should exercise a sharded dit/ with an index"
    saved = {}
    for path in files:
        saved.update(load_file(path))
    state = stack.dit.state_dict()
    assert state.keys() == saved.keys()
    for name, tensor in saved.items():
        assert state[name].dtype == torch.bfloat16
        torch.testing.assert_close(state[name], tensor.to(torch.bfloat16), atol=0, rtol=0, msg=name)
    assert stack.text_encoder.dtype == torch.bfloat16 and stack.vae.dtype == torch.float32
    assert stack.tokenizer.model_max_length == 512
    assert stack.scheduler.config.shift == 12.0
    assert not any(p.is_meta for p in stack.dit.parameters())


def test_dit_loads_through_diffusers_from_pretrained(tiny_checkpoint: Path):
    model = LongCatVideoTransformer3DModel.from_pretrained(tiny_checkpoint, subfolder="dit")
    assert model.config.text_tokens_zero_pad is True and len(model.blocks) == 2


def test_checkpoint_without_dit_names_the_folder(tiny_checkpoint: Path, tmp_path: Path):
    root = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    shutil.rmtree(root / "dit")
    with pytest.raises(CheckpointError) as excinfo:
        load_stack(root)
    message = str(excinfo.value)
    assert str(root) in message and "no dit/ folder" in message and "vae" in message


def test_wrong_shaped_tensor_names_folder_tensor_and_both_shapes(tiny_checkpoint: Path, tmp_path: Path):
    root = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    name = "blocks.1.attn.qkv.weight"
    shard = next(p for p in safetensors_files(root / "dit") if name in load_file(p))
    tensors = load_file(shard)
    expected = list(tensors[name].shape)
    tensors[name] = torch.zeros(expected[0], expected[1] + 3)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as excinfo:
        load_dit(root)
    message = str(excinfo.value)
    assert str(root / "dit") in message and name in message
    assert str([expected[0], expected[1] + 3]) in message and str(expected) in message


def test_missing_tensor_is_refused(tiny_checkpoint: Path, tmp_path: Path):
    root = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    shard = safetensors_files(root / "dit")[0]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=dropped):
        load_dit(root)


def test_wrong_shaped_vae_tensor_is_refused(tiny_checkpoint: Path, tmp_path: Path):
    root = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    path = safetensors_files(root / "vae")[0]
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(1, 2, 3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name} has shape \\[1, 2, 3\\]"):
        load_vae(root)


def test_video_latents_are_normalized_and_decode_back(stack):
    vae = stack.vae
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    latents = encode_video_latents(vae, video)
    assert latents.shape == (1, 16, 2, 2, 2)  # 4x temporal (first frame alone), 8x spatial
    raw = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    torch.testing.assert_close(denormalize_latents(vae, normalize_latents(vae, raw)), raw)
    sampled = encode_video_latents(vae, video, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == latents.shape and not torch.equal(sampled, latents)
    decoded = decode_latents(vae, latents)
    assert decoded.shape == video.shape and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1


@pytest.mark.parametrize(
    ("shape", "message"), [((1, 3, 6, 16, 16), "has 6 frames"), ((1, 3, 5, 12, 16), "is 12x16"), ((1, 5, 16, 16), "got shape")]
)
def test_video_of_wrong_size_is_refused(stack, shape, message):
    with pytest.raises(ValueError, match=message):
        encode_video_latents(stack.vae, torch.zeros(shape))


def test_prompts_encode_to_512_tokens_with_their_mask(stack):
    states, mask = encode_prompts(stack.tokenizer, stack.text_encoder, ["a cat runs in the park", "  the dog &amp;amp; a car "])
    assert states.shape == (2, 1, 512, stack.text_encoder.config.d_model)
    assert mask.shape == (2, 512) and mask.dtype == torch.int64
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] == len(stack.tokenizer("a cat runs in the park").input_ids)
    assert lengths[1] == len(stack.tokenizer("the dog & a car").input_ids)  # cleaned like the official pipeline
    assert torch.all(mask[:, : min(lengths)] == 1) and torch.all(mask[0, lengths[0] :] == 0)
    # The stack fits together: text states feed the DiT directly.
    latents = torch.randn(2, 16, 2, 4, 4)
    out = stack.dit(latents, torch.tensor([500.0, 20.0]), states, mask, num_cond_latents=1)
    assert out.shape == latents.shape


# --- model sources -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "parsed"),
    [
        ("hf://meituan-longcat/LongCat-Video", ModelSource("hf", "meituan-longcat/LongCat-Video")),
        ("hf://org/repo@v1.0", ModelSource("hf", "org/repo", "v1.0")),
        ("s3://models/longcat/final/", ModelSource("s3", "models", prefix="longcat/final")),
        ("/data/LongCat-Video", ModelSource("local", "/data/LongCat-Video")),
    ],
)
def test_sources_parse(source, parsed):
    assert ModelSource.parse(source) == parsed


@pytest.mark.parametrize("source", ["hf://justarepo", "hf://a/b/c", "s3://", "gs://bucket/x"])
def test_bad_sources_are_refused_with_the_form_to_use(source):
    with pytest.raises(ModelSourceError, match="write|use a local path"):
        ModelSource.parse(source)


def test_local_source_is_used_in_place(tiny_checkpoint: Path, tmp_path: Path):
    assert resolve_model_source(str(tiny_checkpoint)) == tiny_checkpoint
    with pytest.raises(ModelSourceError, match="no such directory"):
        resolve_model_source(str(tmp_path / "absent"))


def resolve_in_subprocess(source: str, env: dict[str, str], cache: Path) -> subprocess.CompletedProcess[str]:
    # huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when imported, hence a fresh interpreter.
    code = (
        "import sys; from pathlib import Path\n"
        "from longcat_trainer.model.sources import resolve_model_source\n"
        "print(resolve_model_source(sys.argv[1], cache=Path(sys.argv[2])))\n"
    )
    full_env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", code, source, str(cache)], env=full_env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )


def test_hf_source_offline_fails_fast_naming_the_repo(tmp_path: Path):
    started = time.monotonic()
    result = resolve_in_subprocess("hf://nobody/no-such-model@v9", {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert result.returncode != 0
    assert "hf://nobody/no-such-model@v9" in result.stderr and "cannot be reached" in result.stderr
    assert time.monotonic() - started < 30


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub does for an unknown repository or revision (by X-Error-Code)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        code = "RevisionNotFound" if "/revision/missing-rev" in self.path else "RepoNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        body = json.dumps({"error": code}).encode()
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("hf://nobody/no-such-model", "repository nobody/no-such-model not found"),
        ("hf://meituan-longcat/LongCat-Video@missing-rev", "revision 'missing-rev' does not exist"),
    ],
)
def test_hf_unknown_repo_or_revision_fails_fast_with_the_name(fake_hub: str, tmp_path: Path, source, message):
    started = time.monotonic()
    result = resolve_in_subprocess(source, {"HF_ENDPOINT": fake_hub, "HF_TOKEN": "hf_not_a_real_token_42"}, tmp_path)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr and source in result.stderr
    assert "hf_not_a_real_token_42" not in result.stderr
    assert time.monotonic() - started < 30


# --- s3 source, against the real S3 server -------------------------------------------------------------------


def upload_tree(client, bucket: str, prefix: str, root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


@pytest.mark.s3
def test_s3_source_downloads_once_verifies_and_loads(tiny_checkpoint, s3_server, s3_bucket, tmp_path, monkeypatch):
    client = s3_server.client()
    upload_tree(client, s3_bucket, "models/longcat", tiny_checkpoint)
    for key, value in {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        **s3_server.credentials.as_env(),
    }.items():
        monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"
    source = f"s3://{s3_bucket}/models/longcat"

    local = resolve_model_source(source, cache=cache)
    stack = load_stack(local, dtype=torch.float32)  # the same path that loads the real checkpoint
    assert isinstance(stack.dit, LongCatVideoTransformer3DModel)
    first = {p: p.stat().st_mtime_ns for p in local.rglob("*") if p.is_file()}

    assert resolve_model_source(source, cache=cache) == local  # reused: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*") if p.is_file()} == first

    # A changed object in the bucket is fetched again; a deleted one disappears from the cache.
    client.put_object(Bucket=s3_bucket, Key="models/longcat/scheduler/scheduler_config.json",
                      Body=json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}).encode())
    client.put_object(Bucket=s3_bucket, Key="models/longcat/vae/stale.txt", Body=b"x")
    resolve_model_source(source, cache=cache)
    client.delete_object(Bucket=s3_bucket, Key="models/longcat/vae/stale.txt")
    resolve_model_source(source, cache=cache)
    assert not (local / "vae" / "stale.txt").exists()
    assert json.loads((local / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    assert (local / "dit" / "config.json").stat().st_mtime_ns == first[local / "dit" / "config.json"]


@pytest.mark.s3
def test_s3_source_without_the_layout_names_the_missing_folders(tiny_checkpoint, s3_server, s3_bucket, tmp_path, monkeypatch):
    client = s3_server.client()
    upload_tree(client, s3_bucket, "partial", tiny_checkpoint / "vae")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    for key, value in s3_server.credentials.as_env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ModelSourceError) as excinfo:
        resolve_model_source(f"s3://{s3_bucket}/partial", cache=tmp_path)
    assert f"s3://{s3_bucket}/partial/" in str(excinfo.value) and "dit/" in str(excinfo.value)


@pytest.mark.s3
def test_s3_source_uses_the_endpoint_of_model_storage(tiny_checkpoint, s3_server, s3_bucket, tmp_path, monkeypatch):
    """A pod's trainer gets credentials from the environment but the endpoint only from spec.model.storage."""
    upload_tree(s3_server.client(), s3_bucket, "models/elsewhere", tiny_checkpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    for key, value in s3_server.credentials.as_env().items():
        monkeypatch.setenv(key, value)
    local = resolve_model_source(f"s3://{s3_bucket}/models/elsewhere", cache=tmp_path,
                                 storage=S3Access(endpoint=s3_server.endpoint, credentials_secret="s3"))
    assert (local / "dit" / "config.json").is_file()


def _fetch_in_a_process(source: str, cache: str, env: dict[str, str]) -> subprocess.Popen:
    code = ("import sys; from longcat_trainer.model.sources import resolve_model_source; "
            "print(resolve_model_source(sys.argv[1], cache=__import__('pathlib').Path(sys.argv[2])))")
    return subprocess.Popen([sys.executable, "-c", code, source, cache], env=env, stdout=subprocess.PIPE, text=True)


@pytest.mark.s3
def test_processes_sharing_a_model_cache_fetch_each_file_once(tiny_checkpoint, s3_server, tmp_path):
    """The ranks of a pod, and the pods of a node on one cache volume, fetch into one directory at once."""
    bucket = s3_server.create_bucket()
    upload_tree(s3_server.client(), bucket, "models/longcat", tiny_checkpoint)
    files = sum(1 for p in tiny_checkpoint.rglob("*") if p.is_file())
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server.endpoint, **s3_server.credentials.as_env()}
    source, cache = f"s3://{bucket}/models/longcat", str(tmp_path / "cache")
    before = s3_server.requests(bucket, "GET")

    ranks = [_fetch_in_a_process(source, cache, env) for _ in range(4)]
    roots = {rank.communicate(timeout=120)[0].strip() for rank in ranks}
    assert all(rank.returncode == 0 for rank in ranks) and len(roots) == 1
    assert s3_server.requests(bucket, "GET") - before == files  # each file once, whichever rank fetched it

    restarted = _fetch_in_a_process(source, cache, env)  # the next gang attempt on the same volume
    assert restarted.communicate(timeout=120)[0].strip() in roots and restarted.returncode == 0
    assert s3_server.requests(bucket, "GET") - before == files  # nothing downloaded again
