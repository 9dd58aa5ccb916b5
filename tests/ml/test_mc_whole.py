"""The fused path's whole call in machine code (service.ml.mc_whole): the same samples as the
Python loop over blocks, whatever the threads, the block size or the caller (threads, a forked
child)."""

import multiprocessing
import os
import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from service.ml import mc, mc_simd, mc_whole
from service.ml.mc import sample_outputs
from service.ml.nets import NetworkSpec, build_network


@pytest.fixture
def threads():
    """Sets torch's threads for a test and restores them."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.fixture
def python_loop():
    """Runs the block under the Python loop over blocks instead of the whole call."""
    def run(fn):
        mc._WHOLE_CALL = False
        try:
            return fn()
        finally:
            mc._WHOLE_CALL = True
    return run


def _n_inputs(net: nn.Sequential) -> int:
    return next(m for m in net if isinstance(m, nn.Linear)).in_features


def _manual(seed: int, *modules_of) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(*[make() for make in modules_of])


NETS = {
    "textbook": lambda: build_network(NetworkSpec(64, 10, (64, 64), (0.5, 0.5)), seed=0),
    "uci, one output": lambda: build_network(NetworkSpec(13, 1, (50,), (0.05,), input_dropout=0.05), seed=0),
    "three hidden, refined lanes": lambda: build_network(
        NetworkSpec(7, 3, (33, 17, 9), (0.1, 0.3, 0.2), input_dropout=0.2), seed=1),
    # No dropout between two Linear layers, no biases, a ReLU after the narrow last layer.
    "no middle dropout, no bias, relu last": lambda: _manual(
        2, lambda: nn.Linear(6, 20, bias=False), lambda: nn.Dropout(0.3), lambda: nn.Linear(20, 12), nn.ReLU,
        lambda: nn.Linear(12, 4, bias=False), nn.ReLU),
    "wide output": lambda: _manual(3, lambda: nn.Linear(5, 30), lambda: nn.Dropout(0.5), lambda: nn.Linear(30, 40)),
}


def test_relu_nets_take_the_whole_call():
    for name, make in NETS.items():
        whole = mc._compiled(make()).fused.whole
        assert whole is not None, name
        # each layer's padded weights start on a cache line: the flat array does, and each layer's
        # share is whole vectors of whole rows
        assert whole.weights.ctypes.data % mc_simd.ALIGN == 0 and whole.biases.ctypes.data % mc_simd.ALIGN == 0
        assert all(at * 4 % (whole.lanes * 4) == 0 for at in whole.layers[:, mc_whole.WEIGHT]), name


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_the_whole_call_gives_the_python_loops_samples(name, batch, threads, python_loop):
    net = NETS[name]()
    x = torch.randn(batch, _n_inputs(net), generator=torch.Generator().manual_seed(batch))
    assert mc._compiled(net).fused.whole is not None
    threads(1)
    for max_elements in (2**24, 300):  # one block or several, then many
        whole = sample_outputs(net, x, 100, seed=11, max_elements=max_elements)
        loop = python_loop(lambda: sample_outputs(net, x, 100, seed=11, max_elements=max_elements))
        # The same masks; the matmuls (mc_simd here, torch.mm there) sum in other orders: rounding only.
        torch.testing.assert_close(whole, loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_both_vector_widths_give_the_same_samples(name, threads, monkeypatch):
    # The engine's width (16 lanes with AVX-512) and the other one, on the same net and seed: the
    # tiles sum in the same order (equal bits); a dot-product last layer sums in other orders.
    x = torch.randn(64, _n_inputs(NETS[name]()), generator=torch.Generator().manual_seed(3))
    threads(2)
    results = {}
    for lanes in (mc_simd.NARROW, mc_simd.WIDE):
        monkeypatch.setattr(mc_simd, "LANES", lanes)
        net = NETS[name]()  # a new net: a new plan, built for this width
        assert mc._compiled(net).fused.whole.lanes == lanes
        results[lanes] = sample_outputs(net, x, 100, seed=9)
    narrow, wide = results.values()
    if mc._compiled(net).fused.whole.layers[-1, mc_whole.DOTS]:
        torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(narrow, wide)


@pytest.mark.parametrize("name", ["textbook", "three hidden, refined lanes"])
def test_a_seed_gives_the_same_samples_whatever_the_threads(name, threads):
    net = NETS[name]()
    x = torch.randn(64, _n_inputs(net), generator=torch.Generator().manual_seed(0))
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(sample_outputs(net, x, 100, seed=5))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.equal(results[0], sample_outputs(net, x, 100, seed=6))


@pytest.mark.parametrize("total", [1, 99, 100, 101, 1023, 1024, 1025, 6400, 6401, 100_000])
@pytest.mark.parametrize("widest", [1, 13, 64, 1000])
def test_whole_call_blocks_are_equal_but_for_the_last(total, widest):
    largest = mc._block_rows(total, widest, 2**24, whole=False)
    block = mc._block_rows(total, widest, 2**24, whole=True)
    blocks = -(-total // block)
    assert 1 <= block <= largest
    assert block == total if largest >= total else blocks >= mc._BLOCK_MULTIPLE
    assert blocks * block - total < block


@pytest.mark.parametrize(("total", "widest", "expected"), [
    (6400, 64, (8, 800)), (6400, 50, (8, 800)), (1600, 64, (4, 400)), (100, 64, (1, 100)), (64_000, 64, (64, 1000))])
def test_a_calls_blocks_share_out_evenly_over_one_two_or_four_threads(total, widest, expected):
    block = mc._block_rows(total, widest, 2**24, whole=True)
    assert (-(-total // block), block) == expected


def test_a_call_does_not_wait_for_a_helper_that_does_not_come(threads, monkeypatch):
    # The helper sleeps and is never woken: the calling thread takes all the blocks, closes the
    # call and returns, with the same samples as on one thread.
    net = NETS["textbook"]()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
    threads(1)
    expected = sample_outputs(net, x, 100, seed=9)
    team = mc_whole._team(1)
    monkeypatch.setattr(team, "wake", lambda: None)
    while team.box[mc_whole.SPINNING]:  # until the helper's spin since an earlier call runs out
        threading.Event().wait(0.001)
    threads(2)
    state = int(team.box[mc_whole.STATE])
    assert torch.equal(sample_outputs(net, x, 100, seed=9), expected)
    state_after = int(team.box[mc_whole.STATE])
    assert state_after >> 16 == (state >> 16) + 1  # the call went through the team's box,
    assert state_after & mc_whole._JOINED == 0  # and no helper joined it


def _uci_on_one_thread_then_two(threads) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """The UCI net, a batch of 64 and its samples (seed 2) on one thread; torch then on two."""
    net = NETS["uci, one output"]()
    x = torch.randn(64, 13, generator=torch.Generator().manual_seed(5))
    threads(1)
    expected = sample_outputs(net, x, 100, seed=2)
    threads(2)
    return net, x, expected


def test_a_spinning_helper_joins_a_call_and_shares_its_blocks(threads):
    net, x, expected = _uci_on_one_thread_then_two(threads)
    assert np.isfinite(mc_whole.join_seconds())  # a helper joined the probe's call
    team = mc_whole._team(1)
    joined = 0
    for _ in range(20):  # the helper spins between these calls, so it joins (nearly) all of them
        assert torch.equal(sample_outputs(net, x, 100, seed=2), expected)
        joined += int(team.box[mc_whole.STATE]) & mc_whole._JOINED
    assert joined > 0


def test_a_call_whose_blocks_fail_raises_and_leaves_the_team_working(threads):
    # Weights too short for the table: every block raises, on the caller and on the helper. The
    # call raises once both are done with its arrays, and the next call splits again.
    net, x, expected = _uci_on_one_thread_then_two(threads)
    whole = mc._compiled(net).fused.whole
    keys = mc._fused_keys(4, 2)
    out = np.empty((6400, 1), dtype=np.float32)
    with pytest.raises((ValueError, RuntimeError)):
        for _ in range(20):  # until a helper has joined a failing call (nearly always the first)
            mc_whole.join_seconds()
            mc_whole.run(x.numpy(), whole.first, whole.layers, whole.weights[:100], whole.biases, keys, out, 100, 2,
                         whole.lanes)
    team = mc_whole._team(1)
    assert team.box[mc_whole.STATE] & mc_whole._CLOSED
    assert np.isfinite(mc_whole.join_seconds())
    assert torch.equal(sample_outputs(net, x, 100, seed=2), expected)


def test_inputs_that_do_not_fit_the_net_are_refused_before_any_block_runs():
    whole = mc._compiled(NETS["uci, one output"]()).fused.whole
    with pytest.raises(ValueError, match="inputs of 12 features"):
        mc_whole.run(np.zeros((4, 12), dtype=np.float32), whole.first, whole.layers, whole.weights, whole.biases,
                     mc._fused_keys(4, 1), np.empty((40, 1), dtype=np.float32), 10, 2, whole.lanes)


def test_the_engines_helpers_stop_at_exit():
    # The helpers spin in machine code after each call; exiting right after a split call must not
    # tear it down under them (an abort or a hang instead of exit status 0).
    child = ("import torch; from service.ml.mc import sample_outputs; from service.ml.nets import NetworkSpec, "
             "build_network; torch.set_num_threads(2); "
             "net = build_network(NetworkSpec(64, 10, (64, 64), (0.5, 0.5)), seed=0); "
             "sample_outputs(net, torch.zeros(64, 64), 100)")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_new_team_has_its_helpers_machine_code_before_they_start():
    # A helper that compiled serve itself on its first call held a core for the compile, and a
    # process that exited meanwhile crashed: the team compiles (or loads) it before starting them.
    child = ("from service.ml import mc_whole; assert not mc_whole.serve.signatures; team = mc_whole._team(1); "
             "assert mc_whole.serve.signatures and all(t.is_alive() for t in team.threads)")
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_concurrent_callers_get_their_own_samples(threads):
    threads(2)
    net = NETS["textbook"]()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    expected = {seed: sample_outputs(net, x, 100, seed=seed) for seed in range(6)}
    got: dict[int, torch.Tensor] = {}

    def call(seed: int) -> None:
        for _ in range(5):
            got[seed] = sample_outputs(net, x, 100, seed=seed)

    workers = [threading.Thread(target=call, args=(seed,)) for seed in expected]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert all(torch.equal(got[seed], expected[seed]) for seed in expected)


def _sample_in_child(queue) -> None:
    torch.set_num_threads(2)
    net = NETS["textbook"]()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    queue.put(sample_outputs(net, x, 100, seed=3).numpy())


def test_a_forked_child_splits_its_calls_too(threads):
    # The parent's helper threads do not survive a fork (as in a prefork Celery worker): the
    # child must start its own, not wait on threads it does not have.
    threads(2)
    net = NETS["textbook"]()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    expected = sample_outputs(net, x, 100, seed=3)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_sample_in_child, args=(queue,))
    child.start()
    try:
        result = queue.get(timeout=120)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    assert torch.equal(torch.from_numpy(result), expected)


def test_nets_with_torch_activations_keep_the_python_loop():
    net = build_network(NetworkSpec(5, 3, (32, 16), (0.5, 0.2), activation="tanh"), seed=0)
    fused = mc._compiled(net).fused
    assert fused is not None and fused.whole is None


def test_warm_up_compiles_what_seeded_and_unseeded_calls_run():
    # A signature first seen in a request would compile there (seconds), not at start-up.
    mc.warm_up()
    signatures = set(mc_whole.run_blocks.signatures)
    net = NETS["textbook"]()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    sample_outputs(net, x, 10, seed=1)
    sample_outputs(net, x, 10)
    sample_outputs(net, x.numpy(), 10)
    assert set(mc_whole.run_blocks.signatures) == signatures


def test_mkls_threads_on_the_calling_thread_are_restored(threads):
    # A split call runs the cached prefix's MKL matmuls on one thread, then puts it back.
    if not mc_whole.mkl_threads_settable():
        pytest.skip("MKL's thread setting is not in this torch")
    set_local = mc_whole._SET_LOCAL_THREADS[0]
    threads(2)
    net = NETS["textbook"]()
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    for local in (0, 3):  # MKL's own default (0: no thread-local setting), or one a caller set
        set_local(local)
        sample_outputs(net, x, 100, seed=1)
        assert set_local(0) == local


AVX2_FEATURES = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fxsr,+lzcnt,+mmx,+movbe,+pclmul,+popcnt,"
                 "+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")
AVX2_CHILD = """
import sys
import numpy as np, torch
from service.ml import mc_simd
from service.ml.mc import sample_outputs
from service.ml.nets import NetworkSpec, build_network
assert mc_simd.LANES == mc_simd.NARROW, mc_simd.LANES
torch.set_num_threads(1)
for name, spec in (("uci", NetworkSpec(13, 1, (50,), (0.05,), input_dropout=0.05)),
                   ("three", NetworkSpec(7, 3, (33, 17, 9), (0.1, 0.3, 0.2), input_dropout=0.2))):
    x = torch.randn(64, spec.n_inputs, generator=torch.Generator().manual_seed(3))
    np.save(f"{sys.argv[1]}/{name}.npy", sample_outputs(build_network(spec, seed=0), x, 100, seed=9).numpy())
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 is an x86-64 feature set")
def test_an_avx2_target_gives_the_same_samples(tmp_path, threads):
    # The engine as numba compiles it for a CPU without AVX-512 (8-lane tiles, 256-bit mask
    # words and flags), run on this one: the same samples as here, but for the
    # last layer's sums across lanes (rounding).
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=AVX2_FEATURES,
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    done = subprocess.run([sys.executable, "-c", AVX2_CHILD, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    threads(1)
    for name, spec in (("uci", NetworkSpec(13, 1, (50,), (0.05,), input_dropout=0.05)),
                       ("three", NetworkSpec(7, 3, (33, 17, 9), (0.1, 0.3, 0.2), input_dropout=0.2))):
        x = torch.randn(64, spec.n_inputs, generator=torch.Generator().manual_seed(3))
        here = sample_outputs(build_network(spec, seed=0), x, 100, seed=9)
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / f"{name}.npy")), here, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["textbook", "uci, one output"])
def test_inputs_that_require_grad_give_the_same_samples(name):
    # With a cached prefix the call runs under inference mode; without one (input dropout first)
    # it goes straight to the kernels, which must not trip on a tensor that autograd tracks.
    net = NETS[name]()
    x = torch.randn(8, _n_inputs(net), generator=torch.Generator().manual_seed(6))
    expected = sample_outputs(net, x, 20, seed=4)
    got = sample_outputs(net, x.clone().requires_grad_(True), 20, seed=4)
    assert torch.equal(got, expected) and not got.requires_grad
