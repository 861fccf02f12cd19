"""A local Google Cloud Storage for the gs:// workdir tests: gcp-storage-emulator, plus two things
of the real service it lacks: the `x-goog-generation` header on downloads, which tensorstore's gcs
driver (Orbax's arrays) reads, and the objects.move call (`.../moveTo/o/...`), which gcsfs tries
first for a rename and otherwise retries with back-off before copying.

  python tests/gcs_emulator.py PORT BUCKET   # serves until killed
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
  except NotFound:
    pass
  return _download(request, response, storage, *args, **kwargs)


def _move(request, response, storage, *args, **kwargs):
  bucket = request.params["bucket_name"]
  try:
    moved = objects._copy(request.base_url, storage, bucket, request.params["object_id"], bucket,
                          request.params["dest_object_id"])
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  objects._delete(storage, bucket, request.params["object_id"])
  response.json(moved)


objects.download = _download_with_generation  # objects.get calls it by name
for _, methods in server.HANDLERS:  # the download routes hold the function itself
  for method, handler in list(methods.items()):
    if handler is _download:
      methods[method] = _download_with_generation

server.HANDLERS = ((r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                    r"(?P<dest_object_id>.*[^/]+)$", {server.POST: _move}),) + server.HANDLERS

if __name__ == "__main__":
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server.create_server("localhost", port, in_memory=True, default_bucket=bucket).run()
