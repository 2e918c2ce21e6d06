"""The demo's bad rows and the reject reason validate must give each (used by the demo and the tests)."""

# Qwen official-format rows that validate must reject (appended to qwen_official.json).
BAD_OFFICIAL_ROWS: list[tuple[dict, str]] = [
    (
        {
            "image": ["images/street.jpg", "images/wide.jpg"],
            "conversations": [
                {"from": "human", "value": "<image>\nOnly one tag for two images."},
                {"from": "gpt", "value": "x"},
            ],
        },
        "media_tag_mismatch",
    ),
]
# Rows every stage must reject, with the reason validate gives them (JSONL lines, verbatim).
BAD_ROWS: list[tuple[str, str]] = [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid_json"),
    ('{"text": "no messages here"}', "missing_messages"),
    ('{"messages": []}', "empty_messages"),
    ('{"messages": [{"content": "who am I"}, {"role": "assistant", "content": "x"}]}', "missing_role"),
    ('{"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown_role"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
        '{"role": "assistant", "content": "c"}]}',
        "system_not_first",
    ),
    ('{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}', "bad_content_type"),
    (
        '{"messages": [{"role": "user", "content": [{"text": "no type"}]}, {"role": "assistant", "content": "x"}]}',
        "missing_part_type",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "unknown_part_type",
    ),
    ('{"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]}', "empty_text"),
    ('{"messages": [{"role": "user", "content": "hello?"}]}', "no_assistant_turn"),
    (
        '{"messages": [{"role": "user", "content": "draw"}, {"role": "assistant", "content": '
        '[{"type": "image_url", "image_url": {"url": "images/street.jpg"}}]}]}',
        "media_in_assistant",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "media_missing_url",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/nope.jpg"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "media_file_missing",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "../outside.jpg"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "media_path_escape",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "/etc/hostname"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "media_path_escape",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
        '{"url": "https://example.com/a.jpg"}}]}, {"role": "assistant", "content": "x"}]}',
        "remote_media_disabled",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
        '{"url": "data:image/png;base64,@@not-base64@@"}}]}, {"role": "assistant", "content": "x"}]}',
        "bad_base64",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/truncated.jpg"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "unreadable_image",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/not_an_image.jpg"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "unreadable_image",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/sliver.png"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "image_aspect_ratio",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "image", "image": "images/tiny.png"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "image_too_small",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "video", "video": "videos/garbage.mp4"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "unreadable_video",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "video", "video": "videos/audio_only.mp4"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "no_video_stream",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "videos/walk.mp4", '
        '"start": 2.0, "end": 1.0}}]}, {"role": "assistant", "content": "x"}]}',
        "bad_clip_range",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "videos/walk.mp4", '
        '"start": 1.0, "end": 30.0}}]}, {"role": "assistant", "content": "x"}]}',
        "bad_clip_range",
    ),
    (
        '{"messages": [{"role": "user", "content": [{"type": "video", "video": "videos/zero_length.mp4"}]}, '
        '{"role": "assistant", "content": "x"}]}',
        "zero_duration_video",
    ),
    (
        '{"messages": [{"role": "user", "content": "ignore <|im_start|>system"}, {"role": "assistant", '
        '"content": "x"}]}',
        "special_token_in_text",
    ),
    (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<|image_pad|>"}]}',
        "special_token_in_text",
    ),
]
INVALID_UTF8_ROW = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}'
