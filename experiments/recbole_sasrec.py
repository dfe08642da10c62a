"""Reference figure: RecBole 1.2.1's SASRec on ml-100k under the protocol spnn_fast reports.

Leave-one-out by time, full ranking, HR/NDCG/MRR@5/10/20, selection on validation NDCG@10 with
early stopping; SASRec with RecBole's default hyperparameters. Needs RecBole in its own
environment (it is no dependency of spnn_fast), e.g.::

    python -m venv rb-venv && rb-venv/bin/pip install torch==2.13.0 recbole==1.2.1 \
        'numpy<2' 'pandas<2.2' 'scipy<1.14'
    rb-venv/bin/python experiments/recbole_sasrec.py 0 1 2      # seeds; prints one JSON per seed
    rb-venv/bin/python experiments/recbole_sasrec.py 0 --max-len 20   # a shorter input length

Each JSON holds the test metrics and, for the cold-start comparison, NDCG@10 and HR@10 of the
selected model on cold@3/5/10 (the same test rows, each input cut to its k most recent events).

Two things are worked around, neither changes a number: RecBole 1.2.1 turns on
``torch.autograd.set_detect_anomaly`` when its sequential models are imported (an epoch then
takes many times longer), and its ``evaluate(load_best_model=True)`` calls ``torch.load`` in a way
torch >= 2.6 refuses; the best checkpoint is loaded here the same way instead.
"""

import argparse
import json
import tempfile
import time

CONFIG = {
    "model": "SASRec",
    "dataset": "ml-100k",
    "device": "cpu",
    "use_gpu": False,
    "show_progress": False,
    "reproducibility": True,
    # model: RecBole's SASRec defaults, restated
    "n_layers": 2,
    "n_heads": 2,
    "hidden_size": 64,
    "inner_size": 256,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "initializer_range": 0.02,
    "loss_type": "CE",
    "MAX_ITEM_LIST_LENGTH": 50,
    "train_neg_sample_args": None,
    # training: defaults, with early stopping ending the run
    "epochs": 200,
    "train_batch_size": 2048,
    "learner": "adam",
    "learning_rate": 0.001,
    "weight_decay": 0.0,
    "eval_step": 1,
    "stopping_step": 10,
    # evaluation: the protocol of spnn_fast.protocol
    "eval_args": {
        "split": {"LS": "valid_and_test"},
        "order": "TO",
        "mode": "full",
        "group_by": "user",
    },  # fmt: skip
    "metrics": ["Hit", "NDCG", "MRR"],
    "topk": [5, 10, 20],
    "valid_metric": "NDCG@10",
    "eval_batch_size": 4096,
}


def cold_metrics(model, test_data, ks=(3, 5, 10)) -> dict:
    """NDCG@10 and HR@10 on cold@k: the test rows with each input cut to its k most recent events
    (RecBole's sequences are right-padded: the events sit in columns 0..length-1)."""
    import torch
    from recbole.data.interaction import Interaction

    f = test_data._dataset.inter_feat
    seq, length, target = f["item_id_list"], f["item_length"], f["item_id"]
    cols = torch.arange(seq.shape[1])
    out = {}
    model.eval()
    with torch.no_grad():
        for k in ks:
            kept = length.clamp(max=k)
            src = (length - kept)[:, None] + cols[None, :]  # column j <- column j + length - kept
            cut = torch.where(cols[None, :] < kept[:, None],
                              seq.gather(1, src.clamp(max=seq.shape[1] - 1)), 0)  # fmt: skip
            inter = Interaction({"item_id_list": cut, "item_length": kept, "item_id": target,
                                 "user_id": f["user_id"]})  # fmt: skip
            scores = model.full_sort_predict(inter)
            scores[:, 0] = float("-inf")
            t = scores.gather(1, target[:, None])
            rank = (scores >= t).sum(1).double()  # ties count against the target
            hit = (rank <= 10).double()
            out[f"cold@{k}"] = {"ndcg@10": float((hit / torch.log2(rank + 1)).mean()),
                                "hit@10": float(hit.mean())}  # fmt: skip
    return out


def run(seed: int, max_len: int = 50) -> dict:
    import recbole.model.sequential_recommender  # noqa: F401  (turns anomaly detection on)
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    torch.autograd.set_detect_anomaly(False)
    t0 = time.time()
    cfg = dict(CONFIG, seed=seed, MAX_ITEM_LIST_LENGTH=max_len,
               checkpoint_dir=tempfile.mkdtemp(prefix="recbole-"))  # fmt: skip
    config = Config(model="SASRec", dataset="ml-100k", config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("SASRec")(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], "SASRec")(config, model)
    best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    ckpt = torch.load(trainer.saved_model_file, map_location=trainer.device, weights_only=False)
    trainer.model.load_state_dict(ckpt["state_dict"])
    trainer.model.load_other_parameter(ckpt.get("other_parameter"))
    test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    return {
        "seed": seed,
        "max_len": max_len,
        "best_valid_ndcg@10": float(best_valid),
        "test": {k: float(v) for k, v in test.items()},
        "cold": cold_metrics(trainer.model, test_data),
        "wall_seconds": round(time.time() - t0, 1),
        "users": dataset.user_num - 1,
        "items": dataset.item_num - 1,
        "interactions": dataset.inter_num,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seeds", nargs="*", type=int, default=[0])
    ap.add_argument(
        "--max-len",
        type=int,
        default=50,
        help="MAX_ITEM_LIST_LENGTH: the most recent events SASRec reads (default 50)",
    )
    args = ap.parse_args()
    if args.max_len < 1:
        ap.error(f"--max-len must be >= 1, got {args.max_len}")
    for s in args.seeds:
        print(json.dumps(run(s, args.max_len)), flush=True)
