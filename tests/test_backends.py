"""The backend registry (`se3nb.backends`, `00a_backends`): the environment variable, `override`, requests that cannot
run, the shape fallback, the report, and the ops' registrations in the modules that implement them."""

import dataclasses

import pytest
import torch

import se3nb.backends as backends
import se3nb.model  # noqa: F401  (imports every module that registers backends)
from se3nb.backends import OPS, backend_report, choose, override, parse_backends, register
from se3nb.conv import TFNConv
from se3nb.fiber import Fiber
from se3nb.graph import DestinationCSR
from se3nb.so2_conv import SO2Conv

F32 = torch.float32


@pytest.fixture
def rules():
    "The registered rules, restored after the test (which may register fakes)."
    saved = dict(backends._RULES)
    yield backends._RULES
    backends._RULES.clear()
    backends._RULES.update(saved)
    backends._availability.clear()
    backends._clear()


def test_every_op_is_registered_by_the_module_named_for_it():
    for op, names in OPS.items():
        assert set(names) == {n for o, n in backends._RULES if o == op}, op
    assert set(backends.REGISTERED_BY) == set(OPS)


def test_environment_variable(monkeypatch):
    assert parse_backends('') == {}
    assert parse_backends('torch') == {
        'so2_product': 'torch', 'segment_attention': 'torch', 'frame_rotation': 'torch', 'so2_inference': 'torch',
        'edge_frames': 'torch', 'radial_hidden': 'torch', 'norm_nonlinearity': 'torch', 'channel_mix': 'torch',
        'so2_fold': 'torch',
    }  # fmt: skip
    assert parse_backends('conv=reference, segment_reduce=csr') == {'conv': 'reference', 'segment_reduce': 'csr'}
    assert parse_backends('torch,so2_product=native')['so2_product'] == 'native'  # op=backend beats a bare name
    monkeypatch.setenv('SE3NB_BACKENDS', 'segment_reduce=csr')
    assert choose('segment_reduce', device='cpu', dtype=F32) == 'csr'  # read at every choice, not once
    monkeypatch.setenv('SE3NB_BACKENDS', 'torch')
    assert choose('segment_reduce', device='cpu', dtype=F32) == 'index_add'  # no segment_reduce backend is called torch
    assert choose('segment_attention', device='cuda', dtype=F32) == 'torch'
    monkeypatch.setenv('SE3NB_BACKENDS', 'conv=reference')
    assert choose('conv') == 'reference'
    with override(conv='so2'):  # override beats the environment variable
        assert choose('conv') == 'so2'
    monkeypatch.delenv('SE3NB_BACKENDS')
    assert choose('conv') == 'so2'


@pytest.mark.parametrize(
    'spec,message',
    [
        (
            'so2_prodct=torch',
            "unknown op 'so2_prodct'; the ops are conv, so2_product, segment_attention, segment_reduce",
        ),
        ('conv=fast', "unknown conv backend 'fast'; the conv backends are so2, reference"),
        ('fast', "no op has a backend 'fast'; the backends are csr, index_add, native, reference, so2, torch"),
        ('conv=so2,conv=reference', "names two backends for conv: 'so2' and 'reference'"),
        ('native,torch', "names two backends for so2_product: 'native' and 'torch'"),
    ],
)
def test_bad_names_say_what_is_valid(monkeypatch, spec, message):
    with pytest.raises(ValueError) as error:
        parse_backends(spec)
    assert message in str(error.value)
    monkeypatch.setenv('SE3NB_BACKENDS', spec)
    with pytest.raises(ValueError, match='SE3NB_BACKENDS|unknown'):
        choose('conv')


def test_bad_names_in_override_and_choose():
    with pytest.raises(ValueError, match="unknown op 'attention'; the ops are conv"):
        override(attention='torch').__enter__()
    with pytest.raises(
        ValueError, match="unknown segment_attention backend 'cuda'; the segment_attention backends are triton"
    ):
        override(segment_attention='cuda').__enter__()
    with pytest.raises(ValueError, match="unknown op 'convolution'"):
        choose('convolution')
    with pytest.raises(ValueError, match="unknown so2_product backend 'avx'"):
        register('so2_product', 'avx')
    assert backends._overrides == []  # a refused override leaves nothing behind


def test_override_nests_and_restores_even_after_an_error():
    assert choose('conv') == 'so2'
    with pytest.raises(KeyError):
        with override(conv='reference', so2_product=None):  # None leaves an op as it is
            assert choose('conv') == 'reference' and backends._overrides == [{'conv': 'reference'}]
            with override(conv='so2'):
                assert choose('conv') == 'so2'
            assert choose('conv') == 'reference'
            raise KeyError('boom')
    assert choose('conv') == 'so2' and backends._overrides == []


def test_models_are_built_with_the_chosen_convolution(monkeypatch):
    kw = dict(
        num_layers=1, fiber_in=Fiber({0: 2}), fiber_hidden=Fiber({0: 4, 1: 4}), fiber_out=Fiber({0: 1}), num_heads=2,
        channels_div=2,
    )  # fmt: skip
    default = se3nb.model.SE3Transformer(**kw)
    with override(conv='reference'):
        reference = se3nb.model.SE3Transformer(**kw)
    monkeypatch.setenv('SE3NB_BACKENDS', 'conv=reference')
    from_env = se3nb.model.SE3Transformer(**kw)
    assert default.conv_backend == 'so2' and type(default.graph_modules[-1]) is SO2Conv
    assert isinstance(default.graph_modules[0].to_key_value, SO2Conv)
    for model in (reference, from_env):
        assert model.conv_backend == 'reference' and type(model.graph_modules[-1]) is TFNConv
        assert type(model.graph_modules[0].to_key_value) is TFNConv
    reference.load_state_dict(default.state_dict())  # the same parameters


def test_a_request_that_cannot_run_is_an_error(rules):
    register('segment_reduce', 'csr', available=lambda: "no such kernel on this machine")
    assert choose('segment_reduce', device='cuda', dtype=F32) == 'index_add'  # automatic: skipped, with the reason
    assert "not csr: no such kernel on this machine" in backends._seen['segment_reduce'][('cuda', F32, True, True)][1]
    with override(segment_reduce='csr'), pytest.raises(RuntimeError) as error:
        DestinationCSR(torch.tensor([0, 1, 1]), 2).sum(torch.ones(3, 2))
    assert str(error.value) == (
        "segment_reduce backend 'csr' was requested by override(segment_reduce='csr') but cannot run here "
        "(cpu, float32): no such kernel on this machine. The segment_reduce backends are csr, index_add."
    )
    register('segment_reduce', 'csr', accepts=lambda device, dtype: "float64 only" if dtype != torch.float64 else None)
    with override(segment_reduce='csr'):
        assert choose('segment_reduce', device='cpu', dtype=torch.float64) == 'csr'
        with pytest.raises(RuntimeError, match=r"cannot run here \(cpu, float32\): float64 only"):
            choose('segment_reduce', device='cpu', dtype=F32)


def test_shapes_outside_a_kernels_limits_fall_back_and_say_so(rules):
    register('segment_reduce', 'csr', shape_limits="at most 3 columns")
    with override(segment_reduce='csr'):
        assert choose('segment_reduce', device='cpu', dtype=F32, shape_ok=True) == 'csr'
        assert choose('segment_reduce', device='cpu', dtype=F32, shape_ok=False) == 'index_add'
        report = backend_report()
    assert "segment_reduce: last chose index_add (cpu, float32, shape outside the kernel limits)" in report
    assert (
        "csr was requested by override(segment_reduce='csr'), but the shape is outside its limits (at most 3" in report
    )
    assert choose('segment_reduce', device='cuda', dtype=F32, shape_ok=False) == 'index_add'  # automatic: the same rule


def test_the_report_names_backends_and_reasons(monkeypatch, rules):
    register('segment_attention', 'triton', available=lambda: "triton not installed")
    monkeypatch.setenv('SE3NB_BACKENDS', 'so2_product=torch')
    assert choose('segment_attention', device='cuda', dtype=torch.float16) == 'torch'
    assert choose('so2_product', device='cpu', dtype=F32) == 'torch'
    with override(conv='reference'):
        choose('conv')
        report = backend_report()
    lines = report.splitlines()
    assert "SE3NB_BACKENDS='so2_product=torch'" in lines[0] and "override active: {'conv': 'reference'}" in lines[0]
    assert "conv: last chose reference (any device, any dtype)" in lines
    assert "  * any device, any dtype: reference (requested by override(conv='reference'))" in lines
    assert "so2_product: last chose torch (cpu, float32)" in lines
    assert "  * cpu, float32: torch (requested by SE3NB_BACKENDS='so2_product=torch')" in lines
    assert "segment_attention: last chose torch (cuda, float16)" in lines
    assert any(
        "cuda, float16: torch (not triton: triton not installed; not native: float32 or float64 CPU tensors only; "
        "automatic choice)" in s
        for s in lines
    )
    assert any(s.startswith("    triton     unavailable: triton not installed") for s in lines)
    assert any(s.startswith("    torch      available") or "torch      not checked yet" in s for s in lines)


def test_report_check_evaluates_every_backend():
    report = backend_report(check=True)
    assert "not checked yet" not in report and "not registered" not in report
    for op, names in OPS.items():
        for name in names:
            assert any(line.strip().startswith(f"{name} ") for line in report.splitlines()), (op, name)


def test_autotuned_kernels_measured_slower_are_skipped_unless_requested(rules):
    details = lambda: ["compiled for avx512", "R=2 O=4: forward 2.00 ms vs torch 1.00"]  # noqa: E731
    register('so2_product', 'native', autotuned=True, details=details)
    register('so2_product', 'torch')
    assert choose('so2_product', device='cpu', dtype=F32) == 'native'
    assert choose('so2_product', device='cpu', dtype=F32, faster=False) == 'torch'
    report = backend_report()
    assert "cpu, float32, kernel measured slower: torch (not native: measured slower than torch" in report
    assert "               R=2 O=4: forward 2.00 ms vs torch 1.00" in report.splitlines()  # details of an available one
    with override(so2_product='native'):
        assert choose('so2_product', device='cpu', dtype=F32, faster=False) == 'native'
    register('segment_reduce', 'csr')  # not autotuned: `faster` does not apply
    assert choose('segment_reduce', device='cpu', dtype=F32, faster=False) == 'csr'


def test_decisions_are_cached_until_something_changes(rules):
    calls = []
    register('segment_reduce', 'csr', available=lambda: calls.append(1))  # None: available
    for _ in range(3):
        assert choose('segment_reduce', device='cuda', dtype=F32) == 'csr'
    assert len(calls) == 1  # one decision, then a lookup
    with override(segment_reduce='index_add'):
        assert choose('segment_reduce', device='cuda', dtype=F32) == 'index_add'
    assert choose('segment_reduce', device='cuda', dtype=F32) == 'csr' and len(calls) == 2
    old = backends._RULES['segment_reduce', 'csr']
    register('segment_reduce', 'csr', **{f.name: getattr(old, f.name) for f in dataclasses.fields(old)})
    assert (
        choose('segment_reduce', device='cuda', dtype=F32) == 'csr' and len(calls) == 3
    )  # registering drops the cache


def test_segment_reduce_backends_compute_the_same():
    g = torch.Generator().manual_seed(0)
    dst = torch.randint(0, 6, (30,), generator=g)
    csr = DestinationCSR(dst, 7)  # node 6 has no incoming edges
    x = torch.randn(30, 4, 2, dtype=torch.float64, generator=g)
    results = {}
    for name in OPS['segment_reduce']:
        with override(segment_reduce=name):
            assert choose('segment_reduce', device='cpu', dtype=torch.float64) == name
            results[name] = (csr.sum(x), csr.max(x), csr.softmax(x[:, :, 0]))
    for a, b in zip(results['csr'], results['index_add']):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert (results['csr'][0][6] == 0).all() and (results['csr'][1][6] == 0).all()
