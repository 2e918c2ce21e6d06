-- Validate, phase 1: parse rows and explode them into one table of content parts in a single normal form.
-- Input: `raw` (source, row, line, load_reason), `datasets` (source, source_order, data_folder, split). Output: `parsed`, `turns`, `parts`, `media_refs`.
-- Three input forms are accepted: OpenAI (`messages`, parts text / image_url / video_url), qwen-vl-utils
-- (`messages`, parts text / image / video) and Qwen's official format (`conversations` with from/value and
-- <image>/<video> tags plus top-level `image` / `video` keys).
-- Each JSON document is parsed once (json_transform into typed structs); later steps read struct fields.

-- What a JSON value is, in the user's words (json_type's names such as UBIGINT are DuckDB's, not the user's).
CREATE OR REPLACE TEMP MACRO json_kind(t) AS
CASE t WHEN 'VARCHAR' THEN 'a string' WHEN 'ARRAY' THEN 'a list' WHEN 'OBJECT' THEN 'an object'
       WHEN 'BOOLEAN' THEN 'true/false' WHEN 'NULL' THEN 'null' WHEN 'BIGINT' THEN 'a number'
       WHEN 'UBIGINT' THEN 'a number' WHEN 'DOUBLE' THEN 'a number' WHEN 'HUGEINT' THEN 'a number'
       WHEN 'UHUGEINT' THEN 'a number' ELSE 'missing' END;

CREATE OR REPLACE TEMP TABLE parsed AS
SELECT source, row, load_reason, is_object,
       CASE WHEN is_object THEN json_transform(line,
           '{"messages": [{"role": "VARCHAR", "content": "JSON"}],
             "conversations": [{"from": "VARCHAR", "value": "JSON", "role": "VARCHAR"}],
             "image": "JSON", "video": "JSON"}') END AS s
FROM (SELECT *, load_reason IS NULL AND json_valid(line) AND starts_with(ltrim(line), '{') AS is_object FROM raw);

CREATE OR REPLACE TEMP TABLE turns AS
WITH msg_lists AS (
    SELECT source, row, 'messages' AS fmt, s.messages AS ms FROM parsed WHERE s.messages IS NOT NULL
    UNION ALL
    SELECT source, row, 'conversations',
           list_transform(s.conversations, lambda c: {'role': CASE c."from" WHEN 'human' THEN 'user'
                                                                  WHEN 'gpt' THEN 'assistant'
                                                                  ELSE coalesce(c."from", c.role) END,
                                                 'content': c.value})
    FROM parsed WHERE s.messages IS NULL AND s.conversations IS NOT NULL
)
SELECT *, json_type(content) AS ctype   -- each content's JSON type, computed once for the parts and the rules
FROM (SELECT source, row, fmt, generate_subscripts(ms, 1) - 1 AS msg_idx, unnest(ms, recursive := true) FROM msg_lists);

CREATE OR REPLACE TEMP TABLE parts AS
WITH list_parts AS (            -- messages whose content is a list of parts
    SELECT source, row, msg_idx, role, generate_subscripts(ps, 1) - 1 AS part_idx, unnest(ps) AS p
    FROM (SELECT *, json_transform(content,
              '[{"type": "VARCHAR", "text": "VARCHAR", "image_url": "JSON", "video_url": "JSON", "image": "JSON",
                 "video": "JSON", "video_start": "DOUBLE", "video_end": "DOUBLE"}]') AS ps
          FROM turns WHERE fmt = 'messages' AND ctype = 'ARRAY')
), from_lists AS (
    SELECT source, row, msg_idx, role, part_idx, p.type AS ptype,
           CASE WHEN p.type = 'text' THEN p.text END AS text,
           CASE WHEN p.type IN ('image_url', 'image') THEN 'image'
                WHEN p.type IN ('video_url', 'video') THEN 'video' END AS kind,
           CASE p.type
             WHEN 'image_url' THEN coalesce(json_extract_string(p.image_url, '$.url'),
                                            CASE WHEN json_type(p.image_url) = 'VARCHAR'
                                                 THEN json_extract_string(p.image_url, '$') END)
             WHEN 'video_url' THEN coalesce(json_extract_string(p.video_url, '$.url'),
                                            CASE WHEN json_type(p.video_url) = 'VARCHAR'
                                                 THEN json_extract_string(p.video_url, '$') END)
             WHEN 'image' THEN CASE WHEN json_type(p.image) = 'VARCHAR' THEN json_extract_string(p.image, '$') END
             WHEN 'video' THEN CASE WHEN json_type(p.video) = 'VARCHAR' THEN json_extract_string(p.video, '$')
                                    WHEN json_type(p.video) = 'ARRAY' AND json_array_length(p.video) > 0
                                    THEN p.video::VARCHAR END
           END AS ref,
           p.type = 'video' AND json_type(p.video) = 'ARRAY' AS is_frame_list,
           coalesce(TRY_CAST(json_extract(p.video_url, '$.start') AS DOUBLE), p.video_start) AS video_start,
           coalesce(TRY_CAST(json_extract(p.video_url, '$.end') AS DOUBLE), p.video_end) AS video_end
    FROM list_parts
), string_turns AS (          -- messages whose content is a plain string: one text part
    SELECT source, row, msg_idx, role, 0 AS part_idx, 'text' AS ptype, json_extract_string(content, '$') AS text,
           NULL AS kind, NULL AS ref, false AS is_frame_list, NULL::DOUBLE AS video_start, NULL::DOUBLE AS video_end
    FROM turns WHERE fmt = 'messages' AND ctype = 'VARCHAR'
), conv_pieces AS (           -- Qwen official format: split each value on its <image>/<video> tags
    SELECT source, row, msg_idx, role,
           regexp_split_to_array(value, '<image>|<video>') AS pieces, regexp_extract_all(value, '<image>|<video>') AS tags
    FROM (SELECT *, json_extract_string(content, '$') AS value FROM turns
          WHERE fmt = 'conversations' AND ctype = 'VARCHAR')
), conv_slots AS (
    SELECT source, row, msg_idx, role, tags, generate_subscripts(pieces, 1) - 1 AS i, unnest(pieces) AS piece
    FROM conv_pieces
), conv_parts AS (
    SELECT source, row, msg_idx, role, 2 * i AS slot, NULL AS kind, piece AS text
    FROM conv_slots WHERE piece <> '' OR len(tags) = 0
    UNION ALL
    SELECT source, row, msg_idx, role, 2 * i + 1, CASE tags[i + 1] WHEN '<image>' THEN 'image' ELSE 'video' END, NULL
    FROM conv_slots WHERE i < len(tags)
), conv_numbered AS (         -- the k-th tag of a kind takes the k-th entry of the row's `image` / `video` key
    SELECT *, row_number() OVER (PARTITION BY source, row, msg_idx ORDER BY slot) - 1 AS part_idx,
           row_number() OVER (PARTITION BY source, row, kind ORDER BY msg_idx, slot) - 1 AS k
    FROM conv_parts
), conv_resolved AS (
    SELECT c.source, c.row, c.msg_idx, c.role, c.part_idx, coalesce(c.kind, 'text') AS ptype, c.text, c.kind,
           CASE WHEN c.kind IS NULL THEN NULL
                WHEN json_type(m.media) = 'VARCHAR' AND c.k = 0 THEN json_extract_string(m.media, '$')
                WHEN json_type(m.media) = 'ARRAY' THEN json_extract_string(m.media, '$[' || c.k || ']') END AS ref,
           false, NULL::DOUBLE, NULL::DOUBLE
    FROM conv_numbered c
    JOIN (SELECT source, row, s.image AS image, s.video AS video FROM parsed WHERE s.conversations IS NOT NULL) p
      USING (source, row)
    CROSS JOIN LATERAL (SELECT CASE c.kind WHEN 'image' THEN p.image ELSE p.video END AS media) m
)
SELECT * FROM from_lists
UNION ALL SELECT * FROM string_turns
UNION ALL SELECT * FROM conv_resolved;

-- Distinct media references: each is checked once (and cached across runs by content hash).
CREATE OR REPLACE TEMP TABLE media_refs AS
SELECT DISTINCT p.kind, p.is_frame_list, d.data_folder, p.ref
FROM parts p JOIN datasets d USING (source)
WHERE p.kind IS NOT NULL AND p.ref IS NOT NULL AND p.role IN ('user', 'system');
