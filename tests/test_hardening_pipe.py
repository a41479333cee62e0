"""`pipe:` shard specs run shell commands: refused unless the caller opts in."""
import json
import random

import pytest

from pipeline.loader import ShardLoader
from pipeline.shards import read_segment, resolve_sources, split_spec
from pipeline.tokenize import load_tokenizer
from tests.fixtures.shards import good_sample, write_tar


def _shard(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    samples = [good_sample(f"p{i}", rng) for i in range(n)]
    write_tar(folder / "00000.tar", samples)
    return [s["__key__"] for s in samples]


def test_pipe_specs_are_refused_with_the_way_to_opt_in(tmp_path):
    for spec in ("pipe:curl -s https://h/a.tar", "/data/a.tar::PIPE:cat a.tar:0.5"):
        with pytest.raises(ValueError, match=r"shell command .* data\.allow_pipe: true") as err:
            split_spec(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="allow_pipe"):  # a pipe hidden in a brace alternative
        resolve_sources(f"{{pipe:cat {tmp_path}/x.tar,{tmp_path}/y.tar}}")
    with pytest.raises(ValueError, match="allow_pipe"):
        list(read_segment("pipe:cat x.tar", 0, 1))


def test_a_folder_named_like_a_command_does_not_run_it(tmp_path, tiny_shards_vocab, monkeypatch):
    """The old failure: a local folder `pipe:touch ran; cat shards` with a manifest made the spec load."""
    monkeypatch.chdir(tmp_path)
    _shard(tmp_path / "shards")
    decoy = tmp_path / "pipe:touch ran; cat shards"
    decoy.mkdir()
    (decoy / "manifest.json").write_text(json.dumps({"shards": {"00000.tar": 3}}))
    (decoy / "00000.tar").write_bytes((tmp_path / "shards" / "00000.tar").read_bytes())
    with pytest.raises(ValueError, match="allow_pipe"):
        ShardLoader("pipe:touch ran; cat shards/00000.tar", load_tokenizer(tiny_shards_vocab), batch_size=3)
    assert not (tmp_path / "ran").exists()


@pytest.mark.timeout(60)
def test_allow_pipe_opts_in(tmp_path, tiny_shards_vocab):
    keys = _shard(tmp_path)
    marker = tmp_path / "ran"
    loader = ShardLoader(f"pipe:touch {marker}; cat {tmp_path}/00000.tar", load_tokenizer(tiny_shards_vocab),
                         batch_size=3, train=False, image_res=32, allow_pipe=True)
    assert [k for batch in loader for k in batch["__key__"]] == keys
    assert marker.exists()
