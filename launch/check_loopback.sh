#!/usr/bin/env bash
# Loopback check of dream_dist's two cluster entry points, for real, on this one machine:
#
#   (1) job: ray start --head (own temp dir and ports) -> ray job submit --working-dir . --
#            python dream_dist/run.py ... distill.workers=2 -> outputs checked -> head stopped
#   (2) up:  ray up -y launch/cluster.yaml -> ray submit launch/cluster.yaml dream_dist/run.py ...
#            distill.workers=2 -> outputs checked -> ray down -y launch/cluster.yaml
#
#   bash launch/check_loopback.sh          # both; prints PASS/FAIL per path, exit 0 iff all pass
#   bash launch/check_loopback.sh job      # only (1)            ... up   # only (2)
#
# Needs the checkout's venv (.venv, or $DREAM_DIST_VENV). Path (2) also needs an ssh server and
# rsync: when they are missing and this runs as root, it installs them from Debian's packages
# (apt-get install -y openssh-server rsync). For (2) it then, on this machine:
#   - generates ~/.ssh/dream_dist_loopback once (ed25519, no passphrase): the key cluster.yaml names;
#   - starts an sshd of its own for the duration of the check: 127.0.0.1:22 only, key login only,
#     accepting that one key from 127.0.0.1 only (its AuthorizedKeysFile is
#     ~/.ssh/dream_dist_loopback.authorized; ~/.ssh/authorized_keys and /etc/ssh are not changed);
#   - gives those ssh sessions a HOME of their own ($WORK/home, sshd's SetEnv) standing for the
#     "node": its .bashrc sets this head's Ray temp dir (RAY_TMPDIR) and ports, and puts a `ray`
#     wrapper first on PATH whose `ray stop` stops only this head (see launch/loopback.py: a plain
#     `ray stop`, which `ray down` runs on the head, kills every Ray process of a machine).
# Everything it starts is stopped on exit, on failure and on Ctrl-C too (trap EXIT): the two
# heads (by their temp dirs only, never a broad `ray stop` or pkill), the cluster (ray down), its
# sshd, and the wheel it built into dist/. Logs: $WORK/logs/.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DREAM_DIST_VENV:-$REPO/.venv}
WORK=/tmp/dd_launch                  # outputs (job/, up/), logs/, the node's home/
JOB_TMP=/tmp/ddj                     # Ray temp dir of head (1); short: Ray's socket paths must stay < 108 chars
UP_TMP=/tmp/ddu                      # RAY_TMPDIR of head (2) (its temp dir is $UP_TMP/ray)
NODE_HOME=$WORK/home
SSH_KEY=$HOME/.ssh/dream_dist_loopback
# Ports of neither Ray's defaults nor its worker range (10002-19999): other Ray instances may run.
JOB_PORTS=(--port=6391 --dashboard-port=8291 --ray-client-server-port=23091 --dashboard-agent-listen-port=52391)
JOB_DASHBOARD=http://127.0.0.1:8291
# The tiny run: digits (the embedded default), width-8 ConvNet, 1x3 steps, 2 epochs of evaluation.
TINY=(distill.overrides.width=8 distill.overrides.iterations=1 distill.overrides.inner_steps=3
      distill.overrides.batch_real=16 distill.overrides.net_images=64 distill.overrides.init_images=256
      distill.baseline=false eval.width=8 eval.epochs=2 eval.runs=1 progress=false threads=1
      distill.workers=2)

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1
export PATH="$VENV/bin:$PATH"      # the head of (1) runs jobs with this Python (ray start inherits PATH)
PY=$VENV/bin/python
RAYCLI=("$VENV/bin/ray")

declare -A STATUS=([job]=skipped [up]=skipped)
UP_STARTED=0 SSHD_STARTED=0 WHEEL=""

say() { printf '[check_loopback] %s\n' "$*"; }
# run LOG CMD...: CMD's output into $WORK/logs/LOG; on failure show its tail.
run() {
  local log=$WORK/logs/$1; shift
  say "\$ $*"
  "$@" >>"$log" 2>&1 && return 0
  local rc=$?
  say "FAILED (exit $rc): $*  -- last lines of $log:"
  tail -n 40 "$log" | sed 's/^/    /'
  return $rc
}

# sweep DIR: stop what is left of a head under DIR (an earlier run killed before its cleanup, or this one).
sweep() {
  if "$PY" "$REPO/launch/loopback.py" list "$1" > "$WORK/logs/left.txt"; then
    say "left over under $1:"; sed 's/^/    /' "$WORK/logs/left.txt"
    "$PY" "$REPO/launch/loopback.py" stop "$1"
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$UP_STARTED" = 1 ]; then
    say "cleanup: ray down -y launch/cluster.yaml"
    (cd "$REPO" && timeout 180 "${RAYCLI[@]}" down -y --log-color false launch/cluster.yaml >>"$WORK/logs/up.log" 2>&1)
  fi
  if [ "$SSHD_STARTED" = 1 ] && [ -f "$WORK/sshd.pid" ]; then
    kill "$(cat "$WORK/sshd.pid")" 2>/dev/null && say "cleanup: stopped the check's sshd"
  fi
  # Whatever is left of the two heads, and a `python ~/run.py` of ray submit cut short.
  for dir in "$JOB_TMP" "$UP_TMP" "$NODE_HOME"; do sweep "$dir"; done
  [ -n "$WHEEL" ] && rm -f "$WHEEL" && rmdir "$REPO/dist" 2>/dev/null
  rm -rf "$WORK/src"
  say "summary:"
  for p in job up; do say "$(printf '  %-4s %s' "$p:" "${STATUS[$p]}")"; done
  for p in job up; do [ "${STATUS[$p]}" = FAIL ] && exit 1; done
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------- (1) ray job submit

path_job() {
  local out=$WORK/job
  sweep "$JOB_TMP"
  rm -rf "$out" "$JOB_TMP"
  say "(1) head on this machine: ray start --head --temp-dir=$JOB_TMP ${JOB_PORTS[*]}"
  run job.log "${RAYCLI[@]}" start --head --num-cpus=2 --dashboard-host=127.0.0.1 "${JOB_PORTS[@]}" \
      --temp-dir="$JOB_TMP" --disable-usage-stats || return 1
  (cd "$REPO" && run job.log "${RAYCLI[@]}" job submit --address "$JOB_DASHBOARD" --working-dir . -- \
      python dream_dist/run.py "out_dir=$out" "pack.out=$out/packed" "${TINY[@]}") || return 1
  grep -E "^digits:|^dream_plus|done in" "$WORK/logs/job.log" | sed 's/^/    job> /'
  "$PY" "$REPO/launch/loopback.py" verify "$out" --workers 2 || return 1
  "$PY" "$REPO/launch/loopback.py" stop "$JOB_TMP"
  if "$PY" "$REPO/launch/loopback.py" list "$JOB_TMP"; then say "processes of the head are left"; return 1; fi
}

# ------------------------------------------------------------ (2) ray up / submit / down

ensure_ssh() {
  if [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
      say "openssh-server and rsync are needed: as root, apt-get install -y openssh-server rsync"; return 1
    fi
    say "installing openssh-server and rsync (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    run apt.log apt-get install -y -q openssh-server rsync ||
      { run apt.log apt-get update -q && run apt.log apt-get install -y -q openssh-server rsync; } || return 1
  fi
  mkdir -p -m 700 "$HOME/.ssh"
  [ -f "$SSH_KEY" ] || ssh-keygen -q -t ed25519 -N "" -C dream_dist_loopback -f "$SSH_KEY" || return 1
  echo "from=\"127.0.0.1\",no-agent-forwarding,no-X11-forwarding $(cat "$SSH_KEY.pub")" > "$SSH_KEY.authorized"
  chmod 600 "$SSH_KEY.authorized"

  # The node's HOME: its login environment, and the scoped `ray stop`.
  mkdir -p -m 700 "$NODE_HOME/bin"
  cat > "$NODE_HOME/.bashrc" <<EOF
# Written by launch/check_loopback.sh: the login environment of the loopback "node".
export PATH="\$HOME/bin:$VENV/bin:\$PATH"       # python3 here makes the node's venv
export RAY_TMPDIR=$UP_TMP                        # this head's sessions, sockets, ray_current_cluster
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1
export DD_RAY_PORT=6392 DD_RAY_DASHBOARD_PORT=8292 DD_RAY_CLIENT_PORT=23092 DD_RAY_AGENT_PORT=52392
export DREAM_DIST_BASE_SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
cd "\$HOME"
EOF
  cat > "$NODE_HOME/bin/ray" <<EOF
#!/usr/bin/env bash
# Written by launch/check_loopback.sh. \`ray stop\` stops only this node's head (RAY_TMPDIR);
# anything else is Ray's CLI run by the node's own Python (so its workers use that env).
if [ "\${1:-}" = stop ]; then exec "$PY" "$REPO/launch/loopback.py" stop "\$RAY_TMPDIR"; fi
exec "\$HOME/dd-venv/bin/python" -m ray.scripts.scripts "\$@"
EOF
  chmod +x "$NODE_HOME/bin/ray"

  # A stale sshd of an earlier, killed run of this check.
  if [ -f "$WORK/sshd.pid" ] && grep -q sshd "/proc/$(cat "$WORK/sshd.pid")/cmdline" 2>/dev/null; then
    kill "$(cat "$WORK/sshd.pid")"; sleep 1
  fi
  if ss -ltn | awk '{print $4}' | grep -Eq '^(127\.0\.0\.1|0\.0\.0\.0|\*|\[::\]):22$'; then
    say "port 22 is taken by an ssh server this check did not start: stop it, or run path (1) only"
    return 1
  fi
  mkdir -p /run/sshd
  # UsePAM=no: key login needs no PAM, and PAM's loginuid step fails in containers.
  /usr/sbin/sshd -o ListenAddress=127.0.0.1:22 -o PidFile="$WORK/sshd.pid" -o AllowUsers="$(id -un)" \
    -o PermitRootLogin=prohibit-password -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
    -o UsePAM=no -o AuthorizedKeysFile="$SSH_KEY.authorized" -o SetEnv=HOME="$NODE_HOME" || return 1
  SSHD_STARTED=1
  sleep 1
  local home
  home=$(ssh -i "$SSH_KEY" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
         -o LogLevel=ERROR "$(id -un)@127.0.0.1" 'echo $HOME') || { say "ssh to 127.0.0.1 failed"; return 1; }
  [ "$home" = "$NODE_HOME" ] || { say "ssh session HOME is $home, expected $NODE_HOME"; return 1; }
  say "sshd on 127.0.0.1:22 (pid $(cat "$WORK/sshd.pid")), key $SSH_KEY, node HOME $NODE_HOME"
}

build_wheel() {
  # From a clean copy (what .gitignore/.rayignore leave), so no build/ appears in the checkout.
  rm -rf "$WORK/src" && mkdir -p "$WORK/src" "$REPO/dist" || return 1
  rsync -a --filter=':- .gitignore' --filter=':- .rayignore' "$REPO/" "$WORK/src/" || return 1
  rm -f "$REPO"/dist/dream_dist-*.whl
  run up.log "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$REPO/dist" "$WORK/src" || return 1
  WHEEL=$(ls "$REPO"/dist/dream_dist-*.whl) || return 1
  say "built $WHEEL"
}

path_up() {
  local out=$WORK/up
  sweep "$UP_TMP"
  rm -rf "$out" "$NODE_HOME" "$UP_TMP"    # a fresh node: ray up's setup starts from nothing
  ensure_ssh || return 1
  build_wheel || return 1
  cd "$REPO" || return 1
  UP_STARTED=1
  run up.log "${RAYCLI[@]}" up -y --no-config-cache --log-color false launch/cluster.yaml || return 1
  grep -E "^dream_dist .*configs" "$WORK/logs/up.log" | tail -1 | sed 's/^/    node> /'
  run up.log "${RAYCLI[@]}" submit --log-color false launch/cluster.yaml dream_dist/run.py \
      "out_dir=$out" "pack.out=$out/packed" "${TINY[@]}" || return 1
  grep -E "^digits:|^dream_plus|done in" "$WORK/logs/up.log" | sed 's/^/    submit> /'
  "$PY" "$REPO/launch/loopback.py" verify "$out" --workers 2 || return 1
  run up.log "${RAYCLI[@]}" down -y --log-color false launch/cluster.yaml || return 1
  UP_STARTED=0
  if "$PY" "$REPO/launch/loopback.py" list "$UP_TMP"; then say "processes of the head are left after ray down"; return 1; fi
  say "ray down stopped the head"
}

# ------------------------------------------------------------------------------- main

[ -x "$PY" ] || { say "no venv at $VENV (set DREAM_DIST_VENV)"; exit 2; }
mkdir -p "$WORK/logs" && rm -f "$WORK"/logs/*.log
WHICH=${1:-all}
case $WHICH in job|up|all) ;; *) say "usage: $0 [job|up|all]"; exit 2 ;; esac
for p in job up; do
  [ "$WHICH" = all ] || [ "$WHICH" = "$p" ] || continue
  start=$SECONDS
  if "path_$p"; then STATUS[$p]="PASS ($((SECONDS - start)) s)"; else STATUS[$p]=FAIL; fi
  say "$p: ${STATUS[$p]}"
done
