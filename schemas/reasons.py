"""The fixed list of reject reason codes, in priority order: a row that breaks several rules gets the first."""

REJECT_REASONS: dict[str, str] = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the row is not valid JSON (or not a JSON object)",
    "missing_messages": "no `messages` (or `conversations`) list in the row",
    "empty_messages": "`messages` is an empty list",
    "missing_role": "a message has no role",
    "unknown_role": "a message's role is not system, user or assistant",
    "system_not_first": "a system message is not the first message",
    "bad_content_type": "a message's content is neither a string nor a list of parts",
    "missing_part_type": "a content part has no `type`",
    "unknown_part_type": "a content part's `type` is not text, image_url, video_url, image or video",
    "media_tag_mismatch": "the number of <image>/<video> tags differs from the media listed",
    "empty_text": "a text part or message is empty",
    "no_assistant_turn": "no assistant turn to learn from",
    "media_in_assistant": "an assistant turn holds an image or a video",
    "media_missing_url": "an image or video part has no url or path",
    "special_token_in_text": "text holds a Qwen special token such as <|im_start|> or <|image_pad|>",
    "remote_media_disabled": "http(s) media while validate.allow_remote_media is false",
    "bad_base64": "a data: URL whose base64 payload does not decode",
    "media_path_escape": "a media path resolves outside the dataset's data_folder",
    "media_file_missing": "a media file does not exist",
    "unreadable_image": "an image file cannot be decoded (corrupt, truncated or not an image)",
    "image_aspect_ratio": "an image's aspect ratio exceeds what Qwen's resize accepts",
    "image_too_small": "an image side is below the family's resize factor",
    "unreadable_video": "a video file cannot be opened",
    "no_video_stream": "a video file has no video stream",
    "zero_duration_video": "a video has zero duration or no frames",
    "bad_clip_range": "video start/end seconds are out of order or beyond the duration",
    "duplicate": "an exact duplicate of an earlier accepted sample",
}

REASON_CODES: tuple[str, ...] = tuple(REJECT_REASONS)
