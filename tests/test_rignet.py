"""RigNet: the control-vector layout and its inverse, the per-layer architecture, files."""

import pytest
import torch

from portrait_rig.params import Lighting, Pose, RigParams
from server.models.rignet import ControlLayout, RigNet, apply_controls, control_vector, mix_controls, split_controls
from server.checkpoints.stylerig import load_rignet, read_rignet_metadata, save_rignet
from server.renderer import sh_basis
from server.training.stylerig.evaluate import hemisphere_normals


def random_params(seed: int, n_expression: int) -> RigParams:
    g = torch.Generator().manual_seed(seed)

    def vec(n, scale=0.3):
        return [float(v) for v in torch.randn(n, generator=g) * scale]

    return RigParams(shape=vec(5), expression=vec(n_expression),
                     pose=Pose(global_=vec(3), neck=vec(3), jaw=vec(3), eye_left=vec(3)),
                     lighting=Lighting(sh=[vec(3, 1.0) for _ in range(9)]))


def test_layout_places_each_control():
    layout = ControlLayout(4)
    assert layout.dim == 3 + 3 + 4 + 27
    p = random_params(0, 4)
    c = control_vector(p, layout, dtype=torch.float64)
    assert c.tolist() == [*p.pose.global_, *p.pose.jaw, *p.expression,
                          *(v for row in p.lighting.sh for v in row)]
    assert ControlLayout.for_model(100).n_expression == 50      # DECA's expression code
    with pytest.raises(ValueError, match="n_expression"):
        ControlLayout(51)


def test_control_vector_round_trips_through_rig_params():
    layout = ControlLayout(6)
    original = random_params(1, 9)              # 3 components past the controlled ones
    vector = control_vector(original, layout, dtype=torch.float64)
    back = apply_controls(vector, layout, base=RigParams(shape=original.shape,
                                                         expression=[0.0] * 9))
    assert back.pose.global_ == original.pose.global_ and back.pose.jaw == original.pose.jaw
    assert back.lighting.sh == original.lighting.sh
    assert back.expression[:6] == original.expression[:6]
    assert back.expression[6:] == [0.0] * 3     # not controls: kept from the base
    assert back.shape == original.shape and back.pose.neck == [0.0] * 3

    short = RigParams(expression=[0.5])         # zero-padded to the layout
    assert control_vector(short, layout)[6:12].tolist() == [0.5, 0, 0, 0, 0, 0]


def test_control_vector_of_batch_tensors_round_trips():
    layout = ControlLayout(5)
    g = torch.Generator().manual_seed(2)
    batch = {"global_pose": torch.randn(3, 3, generator=g), "jaw": torch.randn(3, 3, generator=g),
             "expression": torch.randn(3, 7, generator=g),
             "sh": torch.randn(3, 9, 3, generator=g)}
    vector = control_vector(batch, layout)
    parts = split_controls(vector, layout)
    for name in ("global_pose", "jaw", "sh"):
        assert torch.equal(parts[name], batch[name])
    assert torch.equal(parts["expression"], batch["expression"][:, :5])
    rows = apply_controls(vector, layout)
    assert torch.equal(control_vector(rows, layout), vector)
    with pytest.raises(ValueError, match="sh"):
        control_vector(dict(batch, sh=torch.zeros(3, 27)), layout)


def test_mix_controls_swaps_exactly_the_modes_controls():
    layout = ControlLayout(4)
    target, source = torch.zeros(3, layout.dim), torch.ones(3, layout.dim)
    mixed = mix_controls(target, source, ["pose", "expression", "lighting"], layout)
    s = layout.slices
    assert mixed[0].nonzero().flatten().tolist() == list(range(0, 3))
    assert mixed[1].nonzero().flatten().tolist() == list(range(s["jaw"].start, s["jaw"].stop)) \
        + list(range(s["expression"].start, s["expression"].stop))
    assert mixed[2].nonzero().flatten().tolist() == list(range(s["sh"].start, s["sh"].stop))


def randomised(net: RigNet, seed: int = 0) -> RigNet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return net


def test_zero_decoder_is_the_identity():
    net = RigNet(num_ws=6, w_dim=16, latent_dim=4, control_dim=10)
    g = torch.Generator().manual_seed(3)
    w, p = torch.randn(2, 6, 16, generator=g), torch.randn(2, 10, generator=g)
    assert torch.equal(net(w, p), w)            # a fresh RigNet starts as the identity
    randomised(net)
    assert (net(w, p) - w).abs().max() > 1e-3
    with torch.no_grad():
        net.decoder.weight.zero_()
        net.decoder.bias.zero_()
    assert torch.equal(net(w, p), w)


def test_layers_are_independent_and_the_decoder_linear_in_p():
    net = randomised(RigNet(num_ws=5, w_dim=8, latent_dim=3, control_dim=4))
    g = torch.Generator().manual_seed(4)
    w, p, q = (torch.randn(1, 5, 8, generator=g), torch.randn(1, 4, generator=g),
               torch.randn(1, 4, generator=g))
    moved = w.clone()
    moved[:, 2] += 1.0
    changed = (net(moved, p) - net(w, p)).abs().amax(dim=2)[0]
    assert changed[2] > 1e-3 and torch.equal(changed[[0, 1, 3, 4]], torch.zeros(4))
    # d = D_l l + D_p p + b: the effect of a control change does not depend on w.
    torch.testing.assert_close(net(w, p) - net(w, q), net(moved, p) - net(moved, q))


def test_save_load_round_trip(tmp_path):
    layout = ControlLayout(3)
    net = randomised(RigNet(num_ws=4, w_dim=8, latent_dim=2, layout=layout))
    net.set_control_statistics(torch.randn(20, layout.dim))
    path = tmp_path / "rignet.safetensors"
    save_rignet(net, path, {"generator": "ffhq.pkl"})
    loaded = load_rignet(path)
    assert loaded.config() == net.config() and loaded.layout == layout
    assert read_rignet_metadata(path)["generator"] == "ffhq.pkl"
    w, p = torch.randn(3, 4, 8), torch.randn(3, layout.dim)
    assert torch.equal(loaded(w, p), net(w, p).detach())
    assert not any(t.requires_grad for t in loaded.parameters())

    with pytest.raises(ValueError, match="control_dim"):
        RigNet(num_ws=4, w_dim=8, control_dim=5, layout=layout)
    with pytest.raises(ValueError, match=r"p: expected \[3, 36\]"):
        net(w, p[:, :-1])
    from safetensors.torch import load_file, save_file
    # The light map travels with the file; files written before it load with the identity.
    net.set_control_statistics(torch.randn(20, layout.dim), sh_basis(hemisphere_normals()))
    save_rignet(net, path)
    torch.testing.assert_close(load_rignet(path).request_controls(p), net.request_controls(p))
    tensors = load_file(str(path))
    del tensors["light_mean"], tensors["light_map"]
    save_file(tensors, str(path), metadata=read_rignet_metadata(path))
    assert torch.equal(load_rignet(path).request_controls(p), p)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a RigNet"):
        load_rignet(tmp_path / "other.safetensors")


def test_a_save_killed_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    # Training rewrites rignet.safetensors at every checkpoint; the backend may read it.
    import safetensors.torch
    layout = ControlLayout(3)
    before = randomised(RigNet(num_ws=4, w_dim=8, latent_dim=2, layout=layout), seed=1)
    path = tmp_path / "rignet.safetensors"
    save_rignet(before, path)

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x08\x00\x00")
        raise OSError("No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(OSError, match="No space"):
        save_rignet(randomised(RigNet(num_ws=4, w_dim=8, latent_dim=2, layout=layout), seed=2),
                    path)
    w, p = torch.randn(3, 4, 8), torch.randn(3, layout.dim)
    assert torch.equal(load_rignet(path)(w, p), before(w, p).detach())
    assert [f.name for f in tmp_path.iterdir()] == ["rignet.safetensors"]


def test_control_statistics_standardise_p():
    net = randomised(RigNet(num_ws=2, w_dim=4, latent_dim=2, control_dim=3))
    controls = torch.tensor([[0.0, 10.0, -1.0], [2.0, 30.0, 1.0], [4.0, 20.0, 0.0]])
    net.set_control_statistics(controls)
    mean, std = controls.mean(0), controls.std(0)
    assert torch.equal(net.control_mean, mean) and torch.equal(net.control_scale, std)
    with torch.no_grad():
        net.encoder.weight.zero_()
        net.encoder.bias.zero_()
    w = torch.randn(1, 2, 4)
    # Latent 0 and the mean controls (standardised to 0): only the decoder bias remains.
    torch.testing.assert_close(net(w, mean[None]) - w, net.decoder.bias[None])
    # One standard deviation along control 1 adds the decoder's column for it.
    step = mean + std * torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(net(w, step[None]) - net(w, mean[None]),
                               net.decoder.weight[None, :, :, 2 + 1])


def test_light_requests_map_to_the_code_f_reads_for_the_same_visible_shading():
    """F's codes vary only in some directions of the SH space (here: band 2 never does); a
    requested code is replaced by the code of F's distribution that shades the visible
    normals alike. Codes F reads pass nearly unchanged, what F never reads goes to F's mean,
    and no other control moves."""
    layout = ControlLayout(2)
    light = layout.slices["sh"]
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(27, generator=g) * 0.3
    mixing = torch.randn(27, 27, generator=g)
    mixing[12:] = 0                                # band 2 (SH 4..8 -> entries 12..26) fixed
    codes = mean + torch.randn(4000, 27, generator=g) @ mixing.T * 0.2
    controls = torch.randn(4000, layout.dim, generator=g)
    controls[:, light] = codes
    net = RigNet(num_ws=2, w_dim=4, latent_dim=2, layout=layout)
    p = controls[:64].clone()
    assert torch.equal(net.request_controls(p), p)              # before any statistics
    basis = sh_basis(hemisphere_normals())
    net.set_control_statistics(controls, basis)

    def shading(code):                                          # [B, N, 3] on the normals
        return basis @ code.reshape(-1, 9, 3)

    mapped = net.request_controls(p)
    assert torch.equal(mapped[:, : light.start], p[:, : light.start])
    spread = (shading(codes[:64]) - shading(codes[64:128])).square().mean().sqrt()
    moved = (shading(mapped[:, light]) - shading(p[:, light])).square().mean().sqrt()
    assert moved < 0.01 * spread
    # A request with band 2 of its own (a rig's exact light) loses it: F never reads one.
    asked = p.clone()
    asked[:, light.start + 12:] += torch.randn(64, 15, generator=g)
    torch.testing.assert_close(net.request_controls(asked)[:, light.start + 12:],
                               mean[12:].expand(64, 15), atol=1e-4, rtol=0)
