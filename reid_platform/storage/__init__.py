"""Where files live: a local (or shared) path or an object in an S3-compatible store, behind one
location type (``location.py``) and one set of file operations (``files.py``)."""
