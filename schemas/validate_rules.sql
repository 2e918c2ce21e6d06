-- Validate, phase 2: the rules. Inputs: `parsed`, `turns`, `parts` (phase 1), `media_checks` (one row per
-- distinct media reference, from the media checker), `reasons` (code, priority) and the parameter
-- `special_token_regex`. Outputs: `violations`, `rejects`, `accepted`.
-- Every rule emits (source, row, reason, detail, msg_idx, part_idx); a row's reject reason is its
-- highest-priority violation (then the earliest message and part).

CREATE OR REPLACE TEMP TABLE violations AS
WITH msg_counts AS (
    SELECT source, row, count(*) AS n, count(*) FILTER (WHERE role = 'assistant') AS n_assistant FROM turns
    GROUP BY ALL
), conv_tags AS (
    SELECT p.source, p.row, p.kind, count(*) AS tagged,
           CASE json_type(r.j, '$.' || p.kind) WHEN 'ARRAY' THEN json_array_length(r.j, '$.' || p.kind)
                WHEN 'VARCHAR' THEN 1 ELSE 0 END AS listed
    FROM parts p JOIN parsed r USING (source, row)
    JOIN turns t ON t.source = p.source AND t.row = p.row AND t.msg_idx = p.msg_idx AND t.fmt = 'conversations'
    WHERE p.kind IS NOT NULL GROUP BY p.source, p.row, p.kind, r.j
), conv_listed AS (
    SELECT source, row, k.kind,
           CASE json_type(j, '$.' || k.kind) WHEN 'ARRAY' THEN json_array_length(j, '$.' || k.kind)
                WHEN 'VARCHAR' THEN 1 ELSE 0 END AS listed
    FROM parsed, (VALUES ('image'), ('video')) k(kind)
    WHERE json_type(j, '$.messages') IS NULL AND json_type(j, '$.conversations') = 'ARRAY'
), part_media AS (
    SELECT p.*, m.reason AS media_reason, m.detail AS media_detail, m.duration
    FROM parts p JOIN parsed r USING (source, row)
    LEFT JOIN media_checks m ON m.kind = p.kind AND m.data_folder = r.data_folder AND m.ref = p.ref
)
-- row level
SELECT source, row, load_reason AS reason, 'line is not valid UTF-8 (shown with \x escapes)' AS detail,
       -1 AS msg_idx, -1 AS part_idx
FROM parsed WHERE load_reason IS NOT NULL
UNION ALL
SELECT source, row, 'invalid_json',
       CASE WHEN json_valid(line) THEN 'row is JSON but not an object' ELSE 'row is not valid JSON' END, -1, -1
FROM parsed WHERE load_reason IS NULL AND j IS NULL
UNION ALL
SELECT source, row, 'missing_messages',
       CASE WHEN json_type(j, '$.messages') IS NOT NULL THEN 'messages is a ' || json_type(j, '$.messages') || ', not a list'
            WHEN json_type(j, '$.conversations') IS NOT NULL
            THEN 'conversations is a ' || json_type(j, '$.conversations') || ', not a list'
            ELSE 'no messages or conversations key (keys: ' || array_to_string(json_keys(j), ', ') || ')' END, -1, -1
FROM parsed
WHERE j IS NOT NULL AND coalesce(json_type(j, '$.messages'), '') <> 'ARRAY'
  AND NOT (json_type(j, '$.messages') IS NULL AND coalesce(json_type(j, '$.conversations'), '') = 'ARRAY')
UNION ALL
SELECT source, row, 'empty_messages', 'the message list is empty', -1, -1
FROM parsed
WHERE json_array_length(coalesce(json_extract(j, '$.messages'), json_extract(j, '$.conversations'))) = 0
  AND coalesce(json_type(j, '$.messages'), json_type(j, '$.conversations')) = 'ARRAY'
UNION ALL
SELECT source, row, 'no_assistant_turn', n || ' message(s), none from the assistant', -1, -1
FROM msg_counts WHERE n_assistant = 0
UNION ALL
SELECT c.source, c.row, 'media_tag_mismatch',
       coalesce(t.tagged, 0) || ' <' || c.kind || '> tag(s) but ' || c.listed || ' ' || c.kind || '(s) listed', -1, -1
FROM conv_listed c LEFT JOIN conv_tags t USING (source, row, kind)
WHERE coalesce(t.tagged, 0) <> c.listed
-- message level
UNION ALL
SELECT source, row, 'missing_role', 'message ' || msg_idx || ' has no role', msg_idx, -1 FROM turns WHERE role IS NULL
UNION ALL
SELECT source, row, 'unknown_role', 'message ' || msg_idx || ' has role ' || role, msg_idx, -1
FROM turns WHERE role NOT IN ('system', 'user', 'assistant')
UNION ALL
SELECT source, row, 'system_not_first', 'system message at position ' || msg_idx, msg_idx, -1
FROM turns WHERE role = 'system' AND msg_idx > 0
UNION ALL
SELECT source, row, 'bad_content_type',
       'message ' || msg_idx || ' content is ' || coalesce(json_type(content), 'missing'), msg_idx, -1
FROM turns
WHERE coalesce(json_type(content), 'NULL') NOT IN ('VARCHAR', 'ARRAY')
   OR (fmt = 'conversations' AND json_type(content) <> 'VARCHAR')
UNION ALL
SELECT source, row, 'empty_text', 'message ' || msg_idx || ' has no content parts', msg_idx, -1
FROM turns WHERE json_type(content) = 'ARRAY' AND json_array_length(content) = 0
-- part level
UNION ALL
SELECT source, row, 'missing_part_type',
       'message ' || msg_idx || ' part ' || part_idx || CASE WHEN is_object THEN ' has no type' ELSE ' is not an object' END,
       msg_idx, part_idx
FROM parts WHERE ptype IS NULL
UNION ALL
SELECT source, row, 'unknown_part_type', 'part type ' || ptype, msg_idx, part_idx
FROM parts WHERE ptype NOT IN ('text', 'image_url', 'video_url', 'image', 'video')
UNION ALL
SELECT source, row, 'empty_text', 'message ' || msg_idx || ' part ' || part_idx || ' has empty text', msg_idx, part_idx
FROM parts WHERE ptype = 'text' AND trim(coalesce(text, '')) = ''
UNION ALL
SELECT source, row, 'special_token_in_text',
       'text holds ' || regexp_extract(text, getvariable('special_token_regex')), msg_idx, part_idx
FROM parts WHERE ptype = 'text' AND regexp_matches(text, getvariable('special_token_regex'))
UNION ALL
SELECT source, row, 'media_in_assistant', 'assistant message ' || msg_idx || ' holds a ' || kind, msg_idx, part_idx
FROM parts WHERE kind IS NOT NULL AND role = 'assistant'
UNION ALL
SELECT source, row, 'media_missing_url', kind || ' part with no url or path', msg_idx, part_idx
FROM parts WHERE kind IS NOT NULL AND ref IS NULL AND role <> 'assistant'
-- media level (results of the media checker)
UNION ALL
SELECT source, row, media_reason, media_detail, msg_idx, part_idx FROM part_media WHERE media_reason IS NOT NULL
UNION ALL
SELECT source, row, 'bad_clip_range',
       'clip ' || coalesce(video_start::VARCHAR, 'start') || '-' || coalesce(video_end::VARCHAR, 'end')
           || ' s of a ' || round(duration, 3) || ' s video', msg_idx, part_idx
FROM part_media
WHERE kind = 'video' AND media_reason IS NULL AND duration IS NOT NULL
  AND (video_start < 0 OR video_end <= coalesce(video_start, 0) OR video_start >= duration
       OR video_end > duration + 1e-3);

CREATE OR REPLACE TEMP TABLE first_violation AS
SELECT v.source, v.row, arg_min(v.reason, (r.priority, v.msg_idx, v.part_idx)) AS reason,
       arg_min(v.detail, (r.priority, v.msg_idx, v.part_idx)) AS detail
FROM violations v JOIN reasons r ON r.code = v.reason
GROUP BY v.source, v.row;

-- Accepted candidates in the normal form (qwen-vl-utils parts, resolved media paths).
CREATE OR REPLACE TEMP TABLE candidates AS
WITH good AS (
    SELECT p.source, p.row, p.data_folder FROM parsed p ANTI JOIN first_violation USING (source, row)
), norm_parts AS (
    SELECT p.source, p.row, p.msg_idx, p.part_idx, p.role, p.kind, m.path, m.frame_paths, m.sha256,
           m.width, m.height, m.duration, m.fps, m.nframes, p.video_start, p.video_end,
           CASE WHEN p.kind IS NULL THEN json_object('type', 'text', 'text', p.text)
                WHEN p.kind = 'image' THEN json_object('type', 'image', 'image', m.path)
                WHEN m.frame_paths IS NOT NULL THEN json_object('type', 'video', 'video', m.frame_paths)
                WHEN p.video_start IS NULL AND p.video_end IS NULL THEN json_object('type', 'video', 'video', m.path)
                ELSE json_object('type', 'video', 'video', m.path, 'video_start', p.video_start,
                                 'video_end', p.video_end) END AS part,
           CASE WHEN p.kind IS NULL THEN json_object('t', p.text)
                ELSE json_object('m', p.kind, 'h', m.sha256, 's', p.video_start, 'e', p.video_end) END AS key_part
    FROM parts p JOIN good g USING (source, row)
    LEFT JOIN media_checks m ON m.kind = p.kind AND m.data_folder = g.data_folder AND m.ref = p.ref
), norm_msgs AS (
    SELECT source, row, msg_idx, role,
           list(part ORDER BY part_idx) AS content, list(key_part ORDER BY part_idx) AS key_content,
           list(struct_pack(kind, path, frame_paths, sha256, width, height, duration, fps, nframes,
                            video_start, video_end) ORDER BY part_idx) FILTER (WHERE kind IS NOT NULL) AS media
    FROM norm_parts GROUP BY ALL
)
SELECT source, row,
       to_json(list(json_object('role', role, 'content', content) ORDER BY msg_idx))::VARCHAR AS messages,
       substr(sha256(to_json(list(json_object('r', role, 'c', key_content) ORDER BY msg_idx))::VARCHAR), 1, 16)
           AS sample_id,
       flatten(list(coalesce(media, []) ORDER BY msg_idx)) AS media
FROM norm_msgs GROUP BY source, row;

-- Exact duplicates: the first occurrence (dataset order, then row) is kept.
CREATE OR REPLACE TEMP TABLE ranked AS
SELECT c.*, row_number() OVER (PARTITION BY sample_id ORDER BY s.source_order, c.row) AS occurrence,
       first_value(c.source || ':' || c.row) OVER (PARTITION BY sample_id ORDER BY s.source_order, c.row) AS first_seen
FROM candidates c JOIN source_order s USING (source);

CREATE OR REPLACE TEMP TABLE accepted AS
SELECT sample_id, source, row, messages, media FROM ranked WHERE occurrence = 1;

CREATE OR REPLACE TEMP TABLE rejects AS
SELECT p.source, p.row, f.reason, f.detail, p.line AS raw
FROM first_violation f JOIN parsed p USING (source, row)
UNION ALL
SELECT r.source, r.row, 'duplicate', 'same sample as ' || r.first_seen, p.line
FROM ranked r JOIN parsed p USING (source, row) WHERE r.occurrence > 1;
