"""What a checkpoint records of the data streams, and when a resumed run can use it."""

from types import SimpleNamespace

from vlp.config import DataConfig, SynthConfig
from vlp.train.data_stream import gather_data_position, rank_data_position


def run(num_workers=2, **data):
    cfg = SimpleNamespace(data=DataConfig(synth=SynthConfig(num_train=10), num_workers=num_workers,
                                          **data))
    printed = []
    accelerator = SimpleNamespace(num_processes=1, process_index=0, print=printed.append)
    return cfg, accelerator, printed


def test_a_run_like_the_saved_one_gets_its_positions_back():
    cfg, accelerator, printed = run()
    local = {"next_worker": 1, "streams": {"0": [0, 64, 1], "1": [0, 32, 0]}}
    saved = gather_data_position(cfg, accelerator, local)
    assert saved["world_size"] == 1 and saved["num_workers"] == 2 and saved["ranks"] == [local]
    assert rank_data_position(cfg, accelerator, saved) == local and not printed


def test_other_workers_or_data_start_new_streams_with_a_warning():
    cfg, accelerator, _ = run()
    saved = gather_data_position(cfg, accelerator, {"next_worker": 0, "streams": {"0": [0, 8, 0]}})
    for changed in (run(num_workers=3), run(mode="epoch"), run(shuffle_buffer=7)):
        cfg2, accelerator2, printed = changed
        assert rank_data_position(cfg2, accelerator2, saved) == {}
        assert "starts new streams" in printed[0]
    assert rank_data_position(cfg, accelerator, None) == {}  # a checkpoint from before positions
