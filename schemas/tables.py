"""The Arrow schemas of the tables the stages hand to each other (the contracts in DESIGN.md).

The validate outputs are written by DuckDB from the SQL beside this file; everything after validate is here.
"""

import pyarrow as pa

# frame shards (data/frames/shard-*.parquet): one row per sampled frame, one row group per video
FRAME_SCHEMA = pa.schema([("video_key", pa.string()), ("frame", pa.int32()), ("pixels", pa.binary())])

# data/frames/index.parquet: one row per decoded video and how it was sampled
FRAME_INDEX_SCHEMA = pa.schema(
    [
        ("video_key", pa.string()),
        ("sha256", pa.string()),
        ("path", pa.string()),
        ("is_frame_list", pa.bool_()),
        ("shard", pa.string()),
        ("row_group", pa.int32()),
        ("nframes", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("frames_indices", pa.list_(pa.int64())),
        ("timestamps", pa.list_(pa.float64())),
        ("video_fps", pa.float64()),
        ("total_frames", pa.int64()),
        ("fps_sampled", pa.float64()),
        ("video_start", pa.float64()),
        ("video_end", pa.float64()),
    ]
)

# data/frames/rejects.parquet: videos that failed to decode and the samples they affect
DECODE_REJECTS_SCHEMA = pa.schema(
    [
        ("video_key", pa.string()),
        ("path", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("sample_ids", pa.list_(pa.string())),
    ]
)

# data/tokenized/samples.parquet: one row per tokenized sample
TOKENIZED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("length", pa.int32()),
        ("label_tokens", pa.int32()),
        ("image_paths", pa.list_(pa.string())),
        ("image_grid_thw", pa.list_(pa.list_(pa.int32()))),
        ("video_keys", pa.list_(pa.string())),
        ("video_grid_thw", pa.list_(pa.list_(pa.int32()))),
        ("second_per_grid_ts", pa.list_(pa.float64())),
    ]
)

# data/tokenized/rejects.parquet
TOKENIZE_REJECTS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# data/packed/packs.parquet: one row per pack; sample_rows are the samples' row numbers in data/tokenized (what the
# trainer reads them by), sample_ids the same samples by id (for people and checks); total (tokens), label_tokens,
# attention_sq (sum of the squared sample lengths) and vision_patches are what a pack's compute cost is made of
PACKS_SCHEMA = pa.schema(
    [
        ("pack_id", pa.int64()),
        ("sample_ids", pa.list_(pa.string())),
        ("sample_rows", pa.list_(pa.int64())),
        ("lengths", pa.list_(pa.int32())),
        ("total", pa.int64()),
        ("label_tokens", pa.int64()),
        ("attention_sq", pa.int64()),
        ("vision_patches", pa.int64()),
    ]
)
