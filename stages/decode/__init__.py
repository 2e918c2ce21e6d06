"""The decode stage (`stages.decode.stage`) and its parts. Nothing is imported here: a decode worker process
(`stages.decode.worker`) and the readers of frame shards (`stages.decode.shards`) load only what they use."""
