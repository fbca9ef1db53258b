# Sourced by the scripts that drive mesher's ingest with wrk (ceiling.sh, ingest_pg.sh).

# wrk_ingest_setup PORT TRIES NAME MESSAGE LUA: waits (TRIES tenths of a second at most) for the
# mesher on 127.0.0.1:PORT to answer /health, creates the project NAME with the admin token
# `bench`, and writes LUA, a wrk script posting one ~1 KiB event with message MESSAGE. Sets `key`
# (the project's ingest key) and `pad` (the event's filler) for the caller.
wrk_ingest_setup() {
  local port=$1 tries=$2 name=$3 message=$4 lua=$5
  for _ in $(seq "$tries"); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
  key=$(curl -sf -X POST -H 'authorization: Bearer bench' "http://127.0.0.1:$port/api/v1/projects" \
    -d "{\"name\":\"$name\"}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ingest_key"])')
  pad=$(head -c 900 /dev/zero | tr '\0' 'x')
  cat > "$lua" <<LUA
wrk.method = "POST"
wrk.headers["authorization"] = "Bearer $key"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"message":"$message","level":"error","environment":"bench","tags":{"release":"1.0"},"pad":"$pad"}'
LUA
}
