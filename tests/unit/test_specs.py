"""Probe spec loading: the shipped files are valid, and every malformed entry is named."""

import pytest

from argus.collect import abi
from argus.collect.specs import load_specs, parse_spec
from argus.errors import SpecInvalid

pytestmark = pytest.mark.unit

GOOD = """
[library]
family = "nccl"
channel = "nccl"
files = ["libnccl.so*"]

[[probe]]
symbol = "ncclAllReduce"
kind = "collective"
op = "allreduce"
exit = true
args = { count = "reg3", comm = "reg6", stream = "stack1" }
"""


def test_shipped_specs_load_with_the_expected_probes():
    specs = {s.family: s for s in load_specs()}
    assert set(specs) == {"cudart", "cuda_driver", "nccl", "torch", "torch_nccl"}
    cudart = {p.symbol: p for p in specs["cudart"].probes}
    launch = cudart["cudaLaunchKernel"]
    assert launch.variants == ("cudaLaunchKernel_ptsz",)
    assert launch.args == {"kernel": 0, "stream": 7}
    assert launch.flags == abi.PF_STACK  # entry only, reads the stack for the stream
    nccl = {p.symbol: p for p in specs["nccl"].probes}
    init = nccl["ncclCommInitRank"]
    assert init.flags == abi.PF_EXIT | abi.PF_UID_HASH | abi.PF_OUT
    assert init.args["rank"] == 2  # rdx: the by-value id takes no register
    send = nccl["ncclSend"]
    assert send.flags == abi.PF_EXIT | abi.PF_SEQ | abi.PF_PEER
    info = send.probe_info(7)
    assert (info.probe_id, info.seq_arg, info.peer_arg) == (7, 4, 3)
    assert len(nccl) == 16
    torch = {p.name: p for p in specs["torch"].probes}
    assert torch["c10d::ProcessGroupGloo::allreduce"].args == {"comm": 1}  # this = rsi (sret)
    assert torch["c10d::Reducer::all_reduce_bucket"].args == {"ptr": 1}  # void: Bucket& in rsi
    # each backend's methods where that backend is built: Gloo's in libtorch_cpu, NCCL's in
    # libtorch_cuda (a CPU build's libtorch_cpu is never searched for names it cannot have)
    assert specs["torch"].files == ("libtorch_cpu.so*",)
    assert specs["torch_nccl"].files == ("libtorch_cuda.so*",)
    assert {p.name.split("::")[1] for p in specs["torch_nccl"].probes} == {"ProcessGroupNCCL"}
    assert not any("ProcessGroupNCCL" in p.name for p in specs["torch"].probes)


def test_channels_filter():
    assert [s.family for s in load_specs(channels=("nccl",))] == ["nccl"]


def test_spec_matches_files():
    spec = parse_spec(GOOD, "t.toml")
    assert spec.matches_file("libnccl.so.2")
    assert spec.matches_file("libnccl.so.2.18.3")
    assert not spec.matches_file("libcudart.so.12")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('kind = "collective"', 'kind = "teleport"', "t.toml probe #1 (ncclAllReduce): field 'kind'"),
        ('count = "reg3"', 'count = "reg9"', "field 'args.count': 'reg9' is not reg1..reg6"),
        ('count = "reg3"', 'cuont = "reg3"', "field 'args.cuont': unknown argument name"),
        ('op = "allreduce"\n', "", "field 'op' is required for collectives"),
        ('channel = "nccl"', 'channel = "gpu"', "t.toml [library]: field 'channel'"),
        ('exit = true', 'exit = "yes"', "field 'exit' must be true or false"),
        ('symbol = "ncclAllReduce"', 'symbol = ""', "t.toml probe #1: field 'symbol' is required"),
        ('exit = true', 'exit = true\ncolour = 1', "unknown field 'colour'"),
        ('[library]', '[libary]', "t.toml: missing the [library] table"),
        ('files = ["libnccl.so*"]', "files = []", "field 'files' must be a non-empty list"),
    ],
)
def test_invalid_entries_name_the_entry_and_field(old, new, message):
    assert old in GOOD
    with pytest.raises(SpecInvalid) as err:
        parse_spec(GOOD.replace(old, new, 1), "t.toml")
    assert message in str(err.value)


def test_out_needs_exit():
    text = GOOD.replace("exit = true", "exit = false").replace('count = "reg3"', 'out = "reg1"')
    with pytest.raises(SpecInvalid, match="read at return: set exit = true"):
        parse_spec(text, "t.toml")


def test_duplicate_symbol_rejected():
    text = GOOD + GOOD[GOOD.index("[[probe]]") :]
    with pytest.raises(SpecInvalid, match="listed twice"):
        parse_spec(text, "t.toml")


def test_bad_toml():
    with pytest.raises(SpecInvalid, match="t.toml: not valid TOML"):
        parse_spec("[library\n", "t.toml")
