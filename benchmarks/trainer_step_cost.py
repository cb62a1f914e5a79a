"""The built-in cnn's training step through ``jaxcfl.train.train``, per step, from a given source tree.

Run it on two trees to compare two versions of the trainer on one machine, e.g. the engine
against the trainer it replaced (docs/sensitivity.md, "Speed"):

    git worktree add /tmp/old f7435d9 && python benchmarks/trainer_step_cost.py /tmp/old/src
    python benchmarks/trainer_step_cost.py src

One warm-up run compiles; then three runs of 2 epochs (``ks = (1, 3)``, batch 128, no
augmentation), each timed whole (data and evaluation included) and divided by its steps.
The fingerprint of the k = 3 copy shows whether the two trees computed the same bits.
"""
import sys, json
sys.path.insert(0, sys.argv[1])
import jaxcfl
TrainConfig, train = jaxcfl.train.TrainConfig, jaxcfl.train.train  # the preset's public name, in every version
cfg = TrainConfig(model="cnn", epochs=2, batch_size=128, augment=False)
train(cfg, ks=(1.0, 3.0), seed=1, progress=False)  # warm: compile
times = []
for rep in range(3):
    r = train(cfg, ks=(1.0, 3.0), seed=1, progress=False)
    steps = r.step_divergence.shape[0]
    times.append((r.seconds) / steps)
print(json.dumps({"src": jaxcfl.__file__, "per_step_ms": [1000 * t for t in times], "best_ms": 1000 * min(times), "fp": r.fingerprints[1]}))
