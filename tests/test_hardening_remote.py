"""Remote shards: http(s) through fsspec, bounded timeouts and retries, unreachable servers, redacted URLs."""
import logging
import time

import pytest

from pipeline.loader import ShardLoader
from pipeline.remote import Remote, redact
from pipeline.shards import read_segment, resolve_sources
from pipeline.tokenize import load_tokenizer
from tests.fixtures.remote_shards import closed_port, serve_folder, silent_port
from tests.fixtures.shards import write_manifest_file, write_shards

FAST = Remote(timeout_s=0.3, retries=1)  # worst case per call: 2 x 0.3 s + 0.3 s backoff


def _keys(loader):
    return [k for batch in loader for k in batch["__key__"]]


@pytest.mark.timeout(60)
def test_http_shards_load_through_the_real_loader(tmp_path, tiny_shards_vocab):
    """aiohttp is installed, so fsspec serves http:// specs; the keys match the local folder's."""
    folder = tmp_path / "served"
    write_shards(folder, (5, 4))
    tokenizer = load_tokenizer(tiny_shards_vocab)
    local = _keys(ShardLoader(f"{folder}/{{00000..00001}}.tar", tokenizer, batch_size=3, train=False,
                              image_res=32))
    with serve_folder(folder) as base:
        remote = ShardLoader(f"{base}/{{00000..00001}}.tar", tokenizer, batch_size=3, train=False,
                             image_res=32, remote_timeout_s=5, remote_retries=0)
        assert _keys(remote) == local and len(local) == 9
        (folder / "manifest.json").unlink()  # now counted by reading each shard over HTTP
        assert [s.samples for s in resolve_sources(f"{base}/{{00000..00001}}.tar")[0].shards] == [5, 4]


@pytest.mark.timeout(30)
def test_a_server_that_never_answers_times_out_and_is_counted(caplog):
    with silent_port() as port:
        start = time.monotonic()
        got = list(read_segment(f"http://127.0.0.1:{port}/00000.tar", 0, 3, remote=FAST))
        elapsed = time.monotonic() - start
    assert [g.reason for g in got] == ["remote_timeout"] * 3
    assert elapsed < 5
    assert "retrying" in caplog.text and "00000.tar" in caplog.text


@pytest.mark.timeout(30)
def test_a_refused_connection_is_unreachable_not_missing(caplog):
    base = f"http://127.0.0.1:{closed_port()}"
    assert [g.reason for g in read_segment(f"{base}/00000.tar", 0, 2, remote=FAST)] == ["unreachable"] * 2
    with pytest.raises(ValueError, match="unreachable"):
        resolve_sources(f"{base}/{{00000..00001}}.tar", remote=FAST)
    assert "does not exist" not in caplog.text


@pytest.mark.timeout(60)
def test_a_hanging_shard_is_skipped_and_counted_once(tmp_path, tiny_shards_vocab):
    """Shards 4 (hangs) + 6 + 6, batch 4: 4 batches need 16 good samples, 12 exist, so the
    worker wraps and meets the hanging shard twice; its 4 samples count once."""
    write_shards(tmp_path, (4, 6, 6))
    with serve_folder(tmp_path, hang=("00000.tar",)) as base:
        loader = ShardLoader(f"{base}/{{00000..00002}}.tar", load_tokenizer(tiny_shards_vocab), batch_size=4,
                             train=False, image_res=32, remote_timeout_s=0.3, remote_retries=1)
        assert len(_keys(loader)) == 16
    assert loader.bad_samples() == {"remote_timeout": 4}
    assert loader.stats() == {"good": 16, "bad": {"remote_timeout": 4}, "repeated": 4}


@pytest.mark.parametrize("text, secret, kept", [
    ("https://user:tok3n@host:8080/a/{0..1}.tar?x=1", "tok3n", "https://user:***@host:8080/a/{0..1}.tar?x=1"),
    ("https://ghp_s3cr3t@github.com/x.tar", "ghp_s3cr3t", "https://***@github.com/x.tar"),
    ("s3://b/x.tar?AWSAccessKeyId=AKIA1&Signature=sig0&Expires=9", "sig0",
     "s3://b/x.tar?AWSAccessKeyId=***&Signature=***&Expires=9"),
    ("shard 'https://h/a.tar?X-Amz-Credential=cred1&X-Amz-Security-Token=tt&size=3' failed", "cred1",
     "shard 'https://h/a.tar?X-Amz-Credential=***&X-Amz-Security-Token=***&size=3' failed"),
    ("gs://b/a.tar?token=t1;password=p1&sig=s1", "p1", "gs://b/a.tar?token=***;password=***&sig=***"),
])
def test_redact_hides_userinfo_and_secret_query_values(text, secret, kept):
    assert redact(text) == kept and secret not in redact(text)
    assert redact("/data/cc3m/{00000..00331}.tar:0.5::http://[::1]:8000/a.tar") == \
        "/data/cc3m/{00000..00331}.tar:0.5::http://[::1]:8000/a.tar"


@pytest.mark.timeout(30)
def test_no_credential_reaches_a_message(tmp_path, tiny_shards_vocab, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    base = f"http://alice:pa55word@127.0.0.1:{closed_port()}"
    spec = f"{base}/{{00000..00001}}.tar?token=t0ken&part=1"
    with pytest.raises(ValueError) as err:
        ShardLoader(spec, load_tokenizer(tiny_shards_vocab), batch_size=2, remote_timeout_s=0.3, remote_retries=0)
    got = list(read_segment(f"{base}/00000.tar?sig=s1gnature", 0, 1, remote=FAST))
    printed = str(err.value) + caplog.text + got[0].key
    assert "unreachable" in printed and "alice:***@" in printed
    for secret in ("pa55word", "t0ken", "s1gnature"):
        assert secret not in printed

    write_shards(tmp_path, (2,))
    write_manifest_file(tmp_path, {"00000.tar": 2, "00001.tar": 2})
    with serve_folder(tmp_path) as served:  # a missing shard's FileNotFoundError names the URL too
        secret_url = served.replace("http://", "http://bob:hunter2@") + "/00001.tar?key=k3y"
        got = list(read_segment(secret_url, 0, 2, remote=FAST))
    assert [g.reason for g in got] == ["shard_unreadable"] * 2
    assert "hunter2" not in caplog.text and "k3y" not in caplog.text and "k3y" not in got[0].key
