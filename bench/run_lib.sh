# Shared by the bench/run_*.sh scripts (sourced): `run NAME COMMAND...` runs one engine unless
# NAME is in $SKIP, writes its JSON record to $OUT/NAME.json and collects it in `records`.
SKIP=" ${SKIP:-} "
records=()
run() {  # name, command...
  local name=$1; shift
  if [[ $SKIP == *" $name "* ]]; then return; fi
  echo "=== $name: $*" >&2
  if "$@" --json "$OUT/$name.json"; then records+=("$OUT/$name.json"); else echo "=== $name failed" >&2; fi
}
