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
        ('kind = "collective"', 'kind = "teleport"',
         "t.toml probe #1 (ncclAllReduce): field 'kind'"),
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


CPP = "_ZN4c10d16ProcessGroupGloo9allreduceERSt6vectorIN2at6TensorESaIS3_EERKNS_16AllreduceOptionsE"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('family = "nccl"\n', "", "t.toml [library]: missing field 'family'"),
        ('[library]', '[library]\nvendor = "x"', "t.toml [library]: unknown field 'vendor'"),
        ("[[probe]]", "[[zprobe]]", "t.toml: no [[probe]] entries"),
        ('exit = true', 'exit = true\nvariants = "x"',
         "t.toml probe #1 (ncclAllReduce): field 'variants' must be a list of symbol names"),
        ('args = { count = "reg3", comm = "reg6", stream = "stack1" }', 'args = "reg1"',
         "t.toml probe #1 (ncclAllReduce): field 'args' must be a table of name = location"),
        ('count = "reg3"', 'uid = "reg3"',
         "t.toml probe #1 (ncclAllReduce): field 'args.uid': a by-value ncclUniqueId is read "
         "at stack1 only"),
        ('symbol = "ncclAllReduce"', f'symbol = "{CPP}"',
         f"t.toml probe #1 ({CPP}): field 'exit': no return probes on C++ functions"),
        ('kind = "collective"', 'kind = ""',
         "t.toml probe #1 (ncclAllReduce): field 'kind' is required (a non-empty string)"),
    ],
)
def test_every_check_names_the_file_entry_and_field(old, new, message):
    assert old in GOOD
    with pytest.raises(SpecInvalid) as err:
        parse_spec(GOOD.replace(old, new, 1), "t.toml")
    assert str(err.value).startswith(message)


def test_the_first_mistake_in_file_order_is_the_one_named():
    # [library] before the probes, probe #1 before #2, and within an entry: unknown fields,
    # then symbol/kind, kind's value, variants, exit, args, the rules between fields
    bad_lib = GOOD.replace('channel = "nccl"', 'channel = "gpu"').replace(
        'kind = "collective"', 'kind = "teleport"')
    with pytest.raises(SpecInvalid, match=r"^t.toml \[library\]: field 'channel'"):
        parse_spec(bad_lib, "t.toml")
    two = GOOD + GOOD[GOOD.index("[[probe]]"):].replace("ncclAllReduce", "ncclReduce").replace(
        'kind = "collective"', 'kind = "teleport"\ncolour = 1').replace("exit = true", "exit = 1")
    with pytest.raises(SpecInvalid, match=r"^t.toml probe #2 \(ncclReduce\): unknown field"):
        parse_spec(two, "t.toml")
    with pytest.raises(SpecInvalid, match=r"^t.toml probe #2 \(ncclReduce\): field 'kind': "):
        parse_spec(two.replace("\ncolour = 1", ""), "t.toml")
    not_a_table = "probe = [1]\n" + GOOD.replace("[[probe]]", "[[zprobe]]")
    with pytest.raises(SpecInvalid, match=r"^t.toml probe #1: must be a table$"):
        parse_spec(not_a_table, "t.toml")
    order = GOOD.replace("exit = true", 'exit = "x"').replace('count = "reg3"', 'count = "r"')
    with pytest.raises(SpecInvalid, match="field 'exit' must be true or false"):
        parse_spec(order, "t.toml")


def test_specs_load_from_the_folder_the_resources_module_names():
    from argus import resources
    from argus.collect import specs

    assert specs.SPEC_DIR == resources.spec_dir()
    assert [s.source for s in load_specs()] == sorted(p.name for p in specs.SPEC_DIR.glob("*.toml"))
