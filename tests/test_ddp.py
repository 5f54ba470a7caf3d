"""DDP on the CPU (``trainer=ddp_cpu``, two ranks started by re-running ``vlm-train``, as on a
GPU node): ranks train to identical weights on disjoint halves of every step's data."""

from runs import PROBE, batches, cli, cli_train_args, final_state, load_ckpt, steps
from train_probes import state_sha


def test_ddp_cpu_two_ranks_train_to_identical_weights(shapesworld, tmp_path):
    args = [
        "trainer=ddp_cpu",
        *cli_train_args(shapesworld, tmp_path / "logs"),
        *steps(6, 3),
        PROBE,
        "trainer.num_sanity_val_steps=0",
    ]
    proc = cli("vlm-train", args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()  # both ranks in one run dir
    ranks = [final_state(run, r) for r in (0, 1)]
    assert [(s["global_step"], s["world_size"]) for s in ranks] == [(6, 2), (6, 2)]
    assert ranks[0]["sha"] == ranks[1]["sha"]
    assert state_sha(load_ckpt(run / "checkpoints" / "last.ckpt")["state_dict"]) == ranks[0]["sha"]
    shards = [batches(run, r) for r in (0, 1)]  # each rank its own half of every step's data
    assert shards[0].keys() == shards[1].keys() == set(range(6))
    assert all(not set(shards[0][s]) & set(shards[1][s]) for s in range(6))
