-- Validate, phase 1: parse rows and explode them into one table of content parts in a single normal form.
-- Input: `raw` (source, row, data_folder, line, load_reason). Output: `parsed`, `turns`, `parts`, `media_refs`.
-- Three input forms are accepted: OpenAI (`messages`, parts text / image_url / video_url), qwen-vl-utils
-- (`messages`, parts text / image / video) and Qwen's official format (`conversations` with from/value and
-- <image>/<video> tags plus top-level `image` / `video` keys).

CREATE OR REPLACE TEMP TABLE parsed AS
SELECT source, row, data_folder, line, load_reason,
       CASE WHEN load_reason IS NULL AND json_valid(line) AND json_type(line::JSON) = 'OBJECT'
            THEN line::JSON END AS j
FROM raw;

CREATE OR REPLACE TEMP TABLE turns AS
WITH msg_lists AS (
    SELECT source, row, 'messages' AS fmt, json_extract(j, '$.messages[*]') AS ms
    FROM parsed WHERE json_type(j, '$.messages') = 'ARRAY'
    UNION ALL
    SELECT source, row, 'conversations' AS fmt, json_extract(j, '$.conversations[*]') AS ms
    FROM parsed WHERE json_type(j, '$.messages') IS NULL AND json_type(j, '$.conversations') = 'ARRAY'
), exploded AS (
    SELECT source, row, fmt, generate_subscripts(ms, 1) - 1 AS msg_idx, unnest(ms) AS m FROM msg_lists
)
SELECT source, row, fmt, msg_idx,
       CASE WHEN fmt = 'messages' THEN json_extract_string(m, '$.role')
            ELSE CASE json_extract_string(m, '$.from') WHEN 'human' THEN 'user' WHEN 'gpt' THEN 'assistant'
                      ELSE coalesce(json_extract_string(m, '$.from'), json_extract_string(m, '$.role')) END
       END AS role,
       CASE WHEN fmt = 'messages' THEN json_extract(m, '$.content') ELSE json_extract(m, '$.value') END AS content
FROM exploded;

CREATE OR REPLACE TEMP TABLE parts AS
WITH list_parts AS (          -- messages whose content is a list of parts
    SELECT source, row, msg_idx, role, generate_subscripts(ps, 1) - 1 AS part_idx, unnest(ps) AS p
    FROM (SELECT *, json_extract(content, '$[*]') AS ps FROM turns
          WHERE fmt = 'messages' AND json_type(content) = 'ARRAY')
), typed AS (
    SELECT source, row, msg_idx, role, part_idx, p,
           CASE WHEN json_type(p) = 'OBJECT' THEN json_extract_string(p, '$.type') END AS ptype
    FROM list_parts
), from_lists AS (
    SELECT source, row, msg_idx, role, part_idx, ptype,
           CASE WHEN ptype = 'text' THEN json_extract_string(p, '$.text') END AS text,
           CASE WHEN ptype IN ('image_url', 'image') THEN 'image'
                WHEN ptype IN ('video_url', 'video') THEN 'video' END AS kind,
           CASE ptype
             WHEN 'image_url' THEN coalesce(json_extract_string(p, '$.image_url.url'),
                                            CASE WHEN json_type(p, '$.image_url') = 'VARCHAR'
                                                 THEN json_extract_string(p, '$.image_url') END)
             WHEN 'video_url' THEN coalesce(json_extract_string(p, '$.video_url.url'),
                                            CASE WHEN json_type(p, '$.video_url') = 'VARCHAR'
                                                 THEN json_extract_string(p, '$.video_url') END)
             WHEN 'image' THEN CASE WHEN json_type(p, '$.image') = 'VARCHAR' THEN json_extract_string(p, '$.image') END
             WHEN 'video' THEN CASE WHEN json_type(p, '$.video') = 'VARCHAR' THEN json_extract_string(p, '$.video')
                                    WHEN json_type(p, '$.video') = 'ARRAY' AND json_array_length(p, '$.video') > 0
                                    THEN json_extract(p, '$.video')::VARCHAR END
           END AS ref,
           ptype = 'video' AND json_type(p, '$.video') = 'ARRAY' AS is_frame_list,
           TRY_CAST(coalesce(json_extract(p, '$.video_url.start'), json_extract(p, '$.video_start')) AS DOUBLE)
               AS video_start,
           TRY_CAST(coalesce(json_extract(p, '$.video_url.end'), json_extract(p, '$.video_end')) AS DOUBLE)
               AS video_end,
           json_type(p) = 'OBJECT' AS is_object
    FROM typed
), string_turns AS (          -- messages whose content is a plain string: one text part
    SELECT source, row, msg_idx, role, 0 AS part_idx, 'text' AS ptype, json_extract_string(content, '$') AS text,
           NULL AS kind, NULL AS ref, false AS is_frame_list, NULL::DOUBLE AS video_start,
           NULL::DOUBLE AS video_end, true AS is_object
    FROM turns WHERE fmt = 'messages' AND json_type(content) = 'VARCHAR'
), conv_pieces AS (           -- Qwen official format: split each value on its <image>/<video> tags
    SELECT source, row, msg_idx, role, json_extract_string(content, '$') AS value,
           regexp_split_to_array(json_extract_string(content, '$'), '<image>|<video>') AS pieces,
           regexp_extract_all(json_extract_string(content, '$'), '<image>|<video>') AS tags
    FROM turns WHERE fmt = 'conversations' AND json_type(content) = 'VARCHAR'
), conv_slots AS (
    SELECT source, row, msg_idx, role, tags, generate_subscripts(pieces, 1) - 1 AS i, unnest(pieces) AS piece
    FROM conv_pieces
), conv_parts AS (
    SELECT source, row, msg_idx, role, 2 * i AS part_idx, 'text' AS ptype, piece AS text, NULL AS kind
    FROM conv_slots WHERE piece <> '' OR len(tags) = 0
    UNION ALL
    SELECT source, row, msg_idx, role, 2 * i + 1, CASE tags[i + 1] WHEN '<image>' THEN 'image' ELSE 'video' END,
           NULL, CASE tags[i + 1] WHEN '<image>' THEN 'image' ELSE 'video' END
    FROM conv_slots WHERE i < len(tags)
), conv_numbered AS (         -- the k-th tag of a kind takes the k-th entry of the row's `image` / `video` key
    SELECT c.*, row_number() OVER (PARTITION BY c.source, c.row, c.kind ORDER BY c.msg_idx, c.part_idx) - 1 AS k
    FROM conv_parts c
), conv_resolved AS (
    SELECT c.source, c.row, c.msg_idx, c.role, c.part_idx, c.ptype, c.text, c.kind,
           CASE WHEN c.kind IS NULL THEN NULL
                WHEN json_type(p.j, '$.' || c.kind) = 'VARCHAR' AND c.k = 0 THEN json_extract_string(p.j, '$.' || c.kind)
                WHEN json_type(p.j, '$.' || c.kind) = 'ARRAY'
                THEN json_extract_string(p.j, '$.' || c.kind || '[' || c.k || ']') END AS ref,
           false AS is_frame_list, NULL::DOUBLE AS video_start, NULL::DOUBLE AS video_end, true AS is_object
    FROM conv_numbered c JOIN parsed p USING (source, row)
)
SELECT * FROM from_lists
UNION ALL SELECT * FROM string_turns
UNION ALL SELECT * FROM conv_resolved;

-- Distinct media references: each is checked once (and cached across runs by content hash).
CREATE OR REPLACE TEMP TABLE media_refs AS
SELECT DISTINCT p.kind, p.is_frame_list, r.data_folder, p.ref
FROM parts p JOIN parsed r USING (source, row)
WHERE p.kind IS NOT NULL AND p.ref IS NOT NULL AND p.role IN ('user', 'system');
