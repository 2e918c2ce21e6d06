-- Validate, phase 2: the rules. Inputs: `parsed`, `turns`, `parts` (phase 1), `datasets`, `media_checks` (one
-- row per distinct media reference, from the media checker), `reasons` (code, priority) and the variables
-- `special_token_regex` and `eval_threshold`. Outputs: `first_violation`, `accepted` (a view, with each sample's
-- split), `rejects`; the tables in between are dropped after their last use.
-- Every rule emits (source, row, reason, detail, msg_idx, part_idx); a row's reject reason is its
-- highest-priority violation (then the earliest message and part).

-- The media parts (a third of all parts in a typical mix) with their checks; text parts stay in `parts`.
CREATE OR REPLACE TEMP TABLE part_media AS
SELECT p.*, m.reason AS media_reason, m.detail AS media_detail, m.path, m.frame_paths, m.sha256, m.width,
       m.height, m.duration, m.fps, m.nframes
FROM parts p JOIN datasets d USING (source)
LEFT JOIN media_checks m ON m.kind = p.kind AND m.data_folder = d.data_folder AND m.ref = p.ref
WHERE p.kind IS NOT NULL;

CREATE OR REPLACE TEMP TABLE violations AS
WITH msg_counts AS (
    SELECT source, row, count(*) FILTER (WHERE role = 'assistant') AS n_assistant, count(*) AS n
    FROM turns GROUP BY ALL
), conv_listed AS (
    SELECT source, row, k.kind,
           CASE json_type(CASE k.kind WHEN 'image' THEN s.image ELSE s.video END)
                WHEN 'ARRAY' THEN json_array_length(CASE k.kind WHEN 'image' THEN s.image ELSE s.video END)
                WHEN 'VARCHAR' THEN 1 ELSE 0 END AS listed
    FROM parsed, (VALUES ('image'), ('video')) k(kind)
    WHERE s.messages IS NULL AND s.conversations IS NOT NULL
), conv_tagged AS (
    SELECT p.source, p.row, p.kind, count(*) AS tagged
    FROM parts p SEMI JOIN (SELECT source, row FROM turns WHERE fmt = 'conversations') USING (source, row)
    WHERE p.kind IS NOT NULL GROUP BY ALL
)
-- row level
SELECT source, row, load_reason AS reason, 'line is not valid UTF-8 (shown with \x escapes)' AS detail,
       -1 AS msg_idx, -1 AS part_idx
FROM parsed WHERE load_reason IS NOT NULL
UNION ALL
SELECT source, row, 'invalid_json',
       CASE WHEN json_valid(line) THEN 'row is JSON but not an object' ELSE 'row is not valid JSON' END, -1, -1
FROM parsed JOIN raw USING (source, row) WHERE parsed.load_reason IS NULL AND NOT is_object
UNION ALL
SELECT source, row, 'missing_messages',
       CASE WHEN json_type(line, '$.messages') IS NOT NULL
            THEN 'messages is ' || json_kind(json_type(line, '$.messages')) || ', not a list of messages'
            WHEN json_type(line, '$.conversations') IS NOT NULL
            THEN 'conversations is ' || json_kind(json_type(line, '$.conversations')) || ', not a list of turns'
            ELSE 'no messages or conversations key (keys: ' || array_to_string(json_keys(line), ', ') || ')' END,
       -1, -1
FROM parsed JOIN raw USING (source, row) WHERE is_object AND s.messages IS NULL AND s.conversations IS NULL
UNION ALL
SELECT source, row, 'empty_messages', 'the message list is empty', -1, -1
FROM parsed WHERE len(coalesce(s.messages, s.conversations)) = 0
UNION ALL
SELECT source, row, 'no_assistant_turn', n || ' message(s), none from the assistant', -1, -1
FROM msg_counts WHERE n_assistant = 0
UNION ALL
SELECT c.source, c.row, 'media_tag_mismatch',
       coalesce(t.tagged, 0) || ' <' || c.kind || '> tag(s) but ' || c.listed || ' ' || c.kind || '(s) listed', -1, -1
FROM conv_listed c LEFT JOIN conv_tagged t USING (source, row, kind)
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
       'message ' || msg_idx || ' content is ' || json_kind(ctype)
           || CASE fmt WHEN 'conversations' THEN ', not a string' ELSE ', not a string or a list of parts' END,
       msg_idx, -1
FROM turns
WHERE coalesce(ctype, 'NULL') NOT IN ('VARCHAR', 'ARRAY') OR (fmt = 'conversations' AND ctype <> 'VARCHAR')
UNION ALL
SELECT source, row, 'empty_text', 'message ' || msg_idx || ' has no content parts', msg_idx, -1
FROM turns WHERE content = '[]'
-- part level
UNION ALL
SELECT source, row, 'missing_part_type', 'message ' || msg_idx || ' part ' || part_idx || ' has no type',
       msg_idx, part_idx
FROM parts WHERE ptype IS NULL
UNION ALL
SELECT source, row, 'unknown_part_type', 'part type ' || ptype, msg_idx, part_idx
FROM parts WHERE ptype NOT IN ('text', 'image_url', 'video_url', 'image', 'video')
UNION ALL
-- Empty: nothing but space separators, what trim() strips (a newline between Qwen tags is text), 10x trim()'s speed.
SELECT source, row, 'empty_text', 'message ' || msg_idx || ' part ' || part_idx || ' has empty text', msg_idx, part_idx
FROM parts WHERE ptype = 'text' AND regexp_full_match(coalesce(text, ''), '\p{Zs}*')
UNION ALL
SELECT source, row, 'special_token_in_text',
       'text holds ' || regexp_extract(text, getvariable('special_token_regex')), msg_idx, part_idx
FROM parts WHERE ptype = 'text' AND contains(text, '<|') AND regexp_matches(text, getvariable('special_token_regex'))
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

-- Each intermediate table is dropped after its last use: DuckDB then reuses its memory for the next statements
-- (measured at 1M rows: writing the accepted samples 3.0 -> 1.4 s, the whole stage 13.3 -> 9.4 s).
DROP TABLE parsed;
DROP TABLE turns;

CREATE OR REPLACE TEMP TABLE first_violation AS
SELECT v.source, v.row, arg_min(v.reason, (r.priority, v.msg_idx, v.part_idx)) AS reason,
       arg_min(v.detail, (r.priority, v.msg_idx, v.part_idx)) AS detail
FROM violations v JOIN reasons r ON r.code = v.reason
GROUP BY v.source, v.row;

DROP TABLE violations;

-- Accepted candidates in the normal form (qwen-vl-utils parts, resolved media paths).
-- The messages JSON is assembled as one string per row; every value in it goes through to_json, so it is valid
-- JSON by construction. Order inside a row comes from its own (message, part) keys, list_grade_up then list_select:
-- measured faster than list_sort on the structs (1M rows: 1.73 -> 1.46 s), which was 2x faster than ORDER BY
-- aggregates and 4x faster than nested list()/json_object aggregation.
-- Each row's media list is built from the media parts alone, and a row with one media part (the common case)
-- gets its list without an aggregate: list() of 13-field structs costs 3x a string's (1M rows: 1.24 -> 0.74 s).
CREATE OR REPLACE TEMP TABLE media_lists AS
WITH good AS (
    SELECT source, row, struct_pack(msg_idx, part_idx, kind, path, frame_paths, sha256, width, height, duration, fps,
                                    nframes, video_start, video_end) AS item
    FROM part_media ANTI JOIN first_violation USING (source, row)
), counts AS (SELECT source, row, count(*) AS n FROM good GROUP BY source, row)
SELECT source, row, [item] AS media
FROM good SEMI JOIN (SELECT source, row FROM counts WHERE n = 1) USING (source, row)
UNION ALL
SELECT source, row, list_sort(list(item))
FROM good SEMI JOIN (SELECT source, row FROM counts WHERE n > 1) USING (source, row) GROUP BY source, row;

CREATE OR REPLACE TEMP TABLE candidates AS
WITH part_json AS (
    SELECT source, row, msg_idx, part_idx, role, '{"type":"text","text":' || to_json(text) || '}' AS part_json
    FROM parts WHERE kind IS NULL
    UNION ALL
    SELECT source, row, msg_idx, part_idx, role,
           CASE WHEN kind = 'image' THEN '{"type":"image","image":' || to_json(path) || '}'
                WHEN frame_paths IS NOT NULL THEN '{"type":"video","video":' || to_json(frame_paths) || '}'
                WHEN video_start IS NULL AND video_end IS NULL THEN '{"type":"video","video":' || to_json(path) || '}'
                ELSE '{"type":"video","video":' || to_json(path) || ',"video_start":' || to_json(video_start)
                     || ',"video_end":' || to_json(video_end) || '}' END
    FROM part_media
), pieces AS (
    SELECT source, row,
           list(struct_pack(k := msg_idx * 100000 + part_idx,
                            s := CASE WHEN part_idx = 0 THEN CASE WHEN msg_idx > 0 THEN ']},' ELSE '' END
                                                             || '{"role":' || to_json(role) || ',"content":['
                                      ELSE ',' END || part_json)) AS items
    FROM part_json ANTI JOIN first_violation USING (source, row) GROUP BY source, row
)
SELECT source, row,
       '[' || array_to_string(list_transform(list_select(items, list_grade_up(list_transform(items, lambda x: x.k))),
                                             lambda x: x.s), '') || ']}]' AS messages,
       coalesce(media, []) AS media
FROM pieces LEFT JOIN media_lists USING (source, row);

DROP TABLE parts;
DROP TABLE part_media;
DROP TABLE media_lists;

-- The sample id hashes the normal form and its media content. split: an eval dataset's samples, and the training
-- samples whose id hashes under eval_ratio (held out).
CREATE OR REPLACE TEMP TABLE identified AS
WITH hashed AS (
    SELECT c.source, c.row, c.messages, c.media, d.source_order, d.split AS dataset_split,
           substr(sha256(c.messages || chr(30) || array_to_string(list_transform(c.media, lambda m: m.sha256), ',')),
                  1, 16) AS sample_id
    FROM candidates c JOIN datasets d USING (source)
)
SELECT sample_id, source, row, messages, media, source_order,
       CASE WHEN dataset_split = 'eval'
                 OR ('0x' || substr(sha256('eval-split:' || sample_id), 1, 8))::UBIGINT < getvariable('eval_threshold')
            THEN 'eval' ELSE 'train' END AS split
FROM hashed;

DROP TABLE candidates;

-- Exact duplicates keep their first occurrence (dataset order, then row). Only ids seen more than once are ranked.
CREATE OR REPLACE TEMP TABLE duplicates AS
WITH repeated AS (SELECT sample_id FROM identified GROUP BY sample_id HAVING count(*) > 1),
ranked AS (
    SELECT i.source, i.row, i.source_order,
           row_number() OVER (PARTITION BY sample_id ORDER BY i.source_order, i.row) AS occurrence,
           first_value(i.source || ':' || i.row) OVER (PARTITION BY sample_id ORDER BY i.source_order, i.row)
               AS first_seen
    FROM identified i SEMI JOIN repeated USING (sample_id)
)
SELECT source, row, source_order, first_seen FROM ranked WHERE occurrence > 1;

-- A view: the write and the counts read it once each (a table would copy every sample once more, 0.4 s at 1M rows).
CREATE OR REPLACE TEMP VIEW accepted AS SELECT * FROM identified ANTI JOIN duplicates USING (source, row);

CREATE OR REPLACE TEMP TABLE rejects AS
SELECT p.source, p.row, f.reason, f.detail, p.line AS raw, d.source_order
FROM first_violation f JOIN raw p USING (source, row) JOIN datasets d USING (source)
UNION ALL
SELECT u.source, u.row, 'duplicate', 'same sample as ' || u.first_seen, p.line, u.source_order
FROM duplicates u JOIN raw p USING (source, row);
