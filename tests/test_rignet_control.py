"""Training gives rig control: RigNet, trained by the shipped pipeline on a generator whose
truth is known (``tests/support/truth_world.py``), moves a face's true pose to the request
while keeping the rest.

The world is small (the sphere head of ``tests/support/stylerig_fixtures.py``, 32 px, W+ of 6 x 32)
and its landmarks are exact (dlib sees no face on a sphere); the corpus, F and RigNet come from
the same functions the CLI runs. ``bench/bench_rignet_control.py`` measures the same at a larger
scale for every edit mode and the paper's ablations.
"""

import numpy as np
import pytest
import torch

from server.checkpoints.stylerig import load_dfr
from server.training.stylerig.corpus import Corpus, CorpusSettings, build_corpus
from server.training.stylerig.train_dfr import DFRSettings, train_dfr
from server.training.stylerig.train_rignet import RigNetSettings, train_rignet
from tests.support.stylerig_fixtures import write_test_face
from tests.support import rig_control
from tests.support.truth_world import (TruthWorld, WorldConfig, load_world, save_world,
                                       serving_worlds, write_true_landmarks)

pytestmark = [pytest.mark.training, pytest.mark.usefixtures("single_thread_module")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A world, its corpus, F and a pose RigNet, trained as the CLI trains them."""
    root = tmp_path_factory.mktemp("control")
    face, embedding = write_test_face(root)
    config = WorldConfig(face_model=str(face), embedding=str(embedding), z_dim=32, w_dim=32,
                         num_ws=6, img_resolution=32)
    save_world(TruthWorld(config), root / "world.safetensors")
    with serving_worlds():
        build_corpus(root / "corpus", CorpusSettings(
            str(root / "world.safetensors"), count=1024, shard_size=512, image_size=32,
            style_mixing=0.9), progress=False)
        world = load_world(root / "world.safetensors")
        write_true_landmarks(root / "corpus", world)
        train_dfr(root / "corpus", root / "dfr", DFRSettings(
            face_model=str(face), embedding=str(embedding), steps=400, batch_size=16,
            lr=1e-3, lr_decay=0.5, log_every=50, checkpoint_every=0, preview_every=0),
            progress=False)
        rignets = {name: train_rignet(root / "corpus", root / name, RigNetSettings(
            dfr=str(root / "dfr" / "dfr.safetensors"), face_model=str(face),
            embedding=str(embedding), modes=("pose",), steps=200, batch_size=4,
            w_edit=w_edit, log_every=50, checkpoint_every=0, preview_every=0), progress=False)
            for name, w_edit in (("rignet", 1.0), ("no_edit_loss", 0.0))}
    dfr, _ = load_dfr(root / "dfr" / "dfr.safetensors")
    w = rig_control.held_out_latents(world, 128, seed=0, truncation=0.7)
    spread = rig_control.natural_spread(world, w)
    return {"root": root, "world": world, "dfr": dfr, "w": w, "spread": spread, **rignets}


def test_the_world_is_a_generator_with_known_truth(trained):
    world, root = trained["world"], trained["root"]
    corpus = Corpus(root / "corpus")
    assert corpus.manifest["architecture"] == "truth-world" and corpus.n == 1024
    w = corpus.w([0, 1, 2])
    # Style mixing: some samples' later layers come from a second latent.
    assert any(not torch.equal(corpus.w([i])[0, 0], corpus.w([i])[0, -1]) for i in range(8))
    # The corpus images are the world's renders of M(w).
    images = ((world.synthesis(w) + 1) / 2 * 255).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(images - corpus.images([0, 1, 2])).max() <= 1
    # Far from the W distribution the images degrade; on it they do not.
    assert float(world.degradation(w).max()) == 0.0
    assert float(world.degradation(w * 4).min()) > 0.5


def pose_edit(trained, net) -> dict:
    w = trained["w"]
    return rig_control.measure_control(trained["world"], net, trained["dfr"], w, w.roll(1, 0),
                                       trained["spread"])["pose"]


def test_trained_rignet_turns_the_head_to_the_requested_pose(trained):
    pose = pose_edit(trained, trained["rignet"])
    after, before = pose["target"]["pose_deg"]
    # The true pose of the edited face lands far closer to the request than the face was.
    assert after < 0.5 * before, pose
    # ... without turning into another face: identity, background and light stay.
    assert pose["preserved"]["identity"] < 0.4 and pose["preserved"]["content"] < 0.4, pose
    assert pose["degradation"] < 0.05, pose


def test_without_the_edit_loss_there_is_no_control(trained):
    """The measure can fail: trained without L_edit, RigNet keeps faces as they are."""
    after, before = pose_edit(trained, trained["no_edit_loss"])["target"]["pose_deg"]
    assert after > 0.8 * before


def test_images_show_the_light_up_to_the_albedo(trained):
    """The bench's floor for light: fitted to each image (geometry given, albedo unknown),
    the light comes far closer to the truth than the faces' mean light it starts from."""
    world, w = trained["world"], trained["w"][:6]
    start = world.truth(w).sh.mean(0, keepdim=True).expand(len(w), -1, -1)
    fitted = rig_control.light_seen_in_images(world, w, w_albedo=1e-2, steps=150, size=32)
    assert fitted < 0.5 * rig_control.light_error(world, start, w)
