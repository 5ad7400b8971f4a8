"""Searching a gallery of person crops with a registered model (issue 27).

Data flows in this order:

1. ``gallery.py`` / ``sources.py``: the crops (packed shards, image folders, a CSV of paths with
   cameras and timestamps) are embedded with Ray Data by the model, resumably, into
   ``INDEX_DIR/embeddings/``; ``sources.read_crop`` reads any crop back by its metadata path.
2. ``index.py``: ``write_index`` puts the L2-normalised embeddings into FAISS (exact up to a size,
   IVF-PQ with an exact re-scoring of the shortlist above it; sharded when asked), the metadata
   (path, camera, timestamp, source) into a Parquet file, and stamps the index with the model
   (``ModelStamp``) and the recall@10 against exact search measured at build.
3. ``index.GalleryIndex.search``: ranked hits for query embeddings, with exact camera and time
   filters; ``ranked.py`` adds k-reciprocal re-ranking and query expansion of the top candidates
   with the evaluation's own code.
4. ``service.py``: a Ray Serve deployment holding the index and the model behind a REST API and a
   page (``reid serve``). ``reid search`` (cli/search.py) is the one-shot command-line search.
"""
