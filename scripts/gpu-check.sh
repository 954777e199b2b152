#!/usr/bin/env bash
# gpu-check.sh: measure wgpu-batchnorm on a real GPU machine that has no Rust
# toolchain and no network (docs/gpu-check.md).
#
#   gpu-check.sh build [DIR]                        where Rust is: a self-contained folder
#   gpu-check.sh run [DIR] [OUTDIR] [-- ARGS...]    on the GPU machine: report, PyTorch, summary
set -euo pipefail

usage() {
    cat <<'EOF'
Usage:
  gpu-check.sh build [DIR]
      Where Rust is (in the crate): `cargo build --release`, then assemble DIR
      (default target/gpu-check): the release binary wgpu-batchnorm, torch_compare.py,
      this script, BUILD-INFO.txt and, downloaded with apt, the Vulkan loader
      (libvulkan1) as .deb files in DIR/debs. Copy DIR to the GPU machine.

  gpu-check.sh run [DIR] [OUTDIR] [-- REPORT_ARGS...]
      On the GPU machine (no Rust, no network needed). DIR defaults to the folder
      this script is in; OUTDIR to DIR/results. Sets up Vulkan (the bundled loader
      if the system has none, the NVIDIA ICD if the usual places lack one), runs
        wgpu-batchnorm --tuning gpu [--detail] --out OUTDIR/rust [REPORT_ARGS...]
        python3 torch_compare.py --device cuda --rust-csv OUTDIR/rust/results.csv \
                                 --out OUTDIR/torch        (if PyTorch has CUDA)
      and writes OUTDIR/summary.md. REPORT_ARGS go to the report, e.g. `-- --quick`
      for a smoke test or `-- --reps 5`; torch_compare.py follows the report's table.

Environment:
  GPU_CHECK_NO_DEBS=1      build: skip the apt download of the Vulkan loader
  GPU_CHECK_TIMEOUT=SECS   run: stop the GPU steps after this many seconds in all
                           (default 300)
  GPU_CHECK_TORCH_ARGS     run: extra arguments for torch_compare.py (e.g. "--reps 10")
  WGPU_BACKEND             run: the wgpu backend (default vulkan)
  VK_DRIVER_FILES          run: if set, the Vulkan ICD is left as given

Exit status: 0 done; 1 the report failed (no adapter: diagnostics printed) or ran on a
software adapter while nvidia-smi lists a GPU; 2 usage; 4 PyTorch CUDA failed.
EOF
}

say() { printf '== %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$1" >&2; exit "${2:-1}"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script_path="$script_dir/$(basename "${BASH_SOURCE[0]}")"

# ---------------------------------------------------------------- build half

download_debs() { # DIR/debs: libvulkan1 with a private apt state, never the system's lists
    local debs="$1/debs" arch state opts
    if [ -n "${GPU_CHECK_NO_DEBS:-}" ]; then
        warn "GPU_CHECK_NO_DEBS set: no Vulkan loader bundled; the run half will need the GPU machine's own libvulkan.so.1"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        warn "no apt-get here: no Vulkan loader bundled; the run half will need the GPU machine's own libvulkan.so.1"
        return 0
    fi
    arch=$(dpkg --print-architecture 2>/dev/null || true)
    if [ -z "$arch" ]; then
        case "$(uname -m)" in
            x86_64) arch=amd64 ;;
            aarch64) arch=arm64 ;;
            *) arch=$(uname -m) ;;
        esac
    fi
    state="${TMPDIR:-/tmp}/gpu-check-apt-$(id -u)"
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$debs"
    opts=(-q "-oAPT::Architecture=$arch" "-oAPT::Architectures=$arch"
          "-oDir::State::Lists=$state/lists" "-oDir::Cache=$state/cache"
          "-oDir::Cache::pkgcache=" "-oDir::Cache::srcpkgcache="
          "-oAcquire::Languages=none" "-oAcquire::Retries=1" "-oAcquire::http::Timeout=20"
          "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
          "-oAPT::Sandbox::User=$(id -un)")
    say "apt: downloading libvulkan1 ($arch) into $debs (private apt state in $state)"
    # apt-get update exits 0 when every mirror is unreachable ("Err:" lines, no lists).
    local unreachable=""
    if ! apt-get "${opts[@]}" update >"$state/update.log" 2>&1 || grep -q '^Err:' "$state/update.log"; then
        unreachable=1
        warn "apt-get update could not reach (all) package mirrors (log: $state/update.log):"
        grep -A1 '^Err:' "$state/update.log" | head -n 4 >&2 || tail -n 4 "$state/update.log" >&2 || true
    fi
    if ! (cd "$debs" && apt-get "${opts[@]}" download libvulkan1) >"$state/download.log" 2>&1; then
        warn "apt-get download libvulkan1 failed${unreachable:+ (no package mirror reachable)} (log: $state/download.log):"
        tail -n 3 "$state/download.log" >&2 || true
        warn "continuing WITHOUT the Vulkan loader .deb: the run half will use the GPU machine's own libvulkan.so.1 (and fail with no adapter if it has none)"
        rm -rf "$debs"
        return 0
    fi
    ls -l "$debs"/*.deb
}

cmd_build() {
    [ $# -le 1 ] || { usage >&2; exit 2; }
    local root dir target bin t0 t
    root=$(cd "$script_dir/.." && pwd)
    grep -q '^name = "wgpu-batchnorm"' "$root/Cargo.toml" 2>/dev/null \
        || die "build runs from the crate (scripts/gpu-check.sh); $root/Cargo.toml is not wgpu-batchnorm's" 2
    dir=$(abspath "${1:-$root/target/gpu-check}")
    target=$(abspath "${CARGO_TARGET_DIR:-$root/target}")
    command -v cargo >/dev/null 2>&1 || die "build needs cargo (the run half is the one for machines without Rust)" 2
    t0=$(now)

    say "cargo build --release --bins"
    t=$(now)
    (cd "$root" && cargo build --release --bins)
    bin="$target/release/wgpu-batchnorm"
    [ -x "$bin" ] || die "cargo built, but $bin is missing"
    echo "   ($(since "$t") s)"

    say "assembling $dir"
    mkdir -p "$dir"
    # Only what this script puts there, so that DIR may be any folder.
    rm -rf "$dir/wgpu-batchnorm" "$dir/torch_compare.py" "$dir/gpu-check.sh" \
        "$dir/BUILD-INFO.txt" "$dir/debs" "$dir/root"
    cp "$bin" "$dir/wgpu-batchnorm"
    cp "$root/benches/torch_compare.py" "$dir/torch_compare.py"
    cp "$script_path" "$dir/gpu-check.sh"
    chmod +x "$dir/wgpu-batchnorm" "$dir/gpu-check.sh"
    {
        echo "wgpu-batchnorm $(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)"
        if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
            echo "commit: $(git -C "$root" rev-parse HEAD)$(git -C "$root" diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)')"
        fi
        echo "rustc: $(rustc -V 2>/dev/null || echo unknown)"
        echo "built: $(date -u '+%Y-%m-%d %H:%M UTC') on $(uname -sm)"
        if command -v objdump >/dev/null 2>&1; then
            echo "needs glibc: $(objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1 | sed 's/GLIBC_//') or newer"
        fi
    } >"$dir/BUILD-INFO.txt"
    cat "$dir/BUILD-INFO.txt"

    t=$(now)
    download_debs "$dir"
    echo "   ($(since "$t") s)"

    say "done in $(since "$t0") s: $dir ($(du -sh "$dir" | cut -f1))"
    ls -l "$dir"
    local name
    name=$(basename "$dir")
    cat <<EOF

Copy it to the GPU machine (scp or rsync) and run it there:
  scp -r $dir host:
  rsync -a $dir host:
  ssh host 'cd $name && ./gpu-check.sh run'
The results land in $name/results/ on the host (summary.md first); fetch them with
  scp -r host:$name/results ./gpu-check-results
EOF
}

# ---------------------------------------------------------------- run half

icd_dirs=(/etc/xdg/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d /usr/share/vulkan/icd.d)
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json

ldconfig_libs() { { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true; }; }

find_lib() { # prints the first path of library $1 in LD_LIBRARY_PATH or the ldconfig cache
    local d libs hit dirs=()
    IFS=: read -r -a dirs <<<"${LD_LIBRARY_PATH:-}"
    for d in "${dirs[@]}" /usr/local/nvidia/lib64; do
        if [ -n "$d" ] && [ -e "$d/$1" ]; then echo "$d/$1"; return 0; fi
    done
    libs=$(ldconfig_libs)
    # The 64-bit entry ("(libc6,x86-64)", "(libc6,AArch64)") before a 32-bit "(libc6)" one.
    hit=$(awk -v lib="$1" '$1 == lib && $2 ~ /,/ { print $NF; exit }' <<<"$libs")
    [ -n "$hit" ] || hit=$(awk -v lib="$1" '$1 == lib { print $NF; exit }' <<<"$libs")
    if [ -n "$hit" ]; then echo "$hit"; return 0; fi
    return 1
}

extract_deb() { # extract_deb DEB PREFIX: dpkg -x, or ar + tar through python3 without dpkg
    if command -v dpkg >/dev/null 2>&1; then
        dpkg -x "$1" "$2"
    else
        python3 - "$1" "$2" <<'EOF'
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"!<arch>\n", "not a .deb"
pos = 8
while pos < len(data):
    name = data[pos:pos + 16].decode().strip().rstrip("/")
    size = int(data[pos + 48:pos + 58])
    body = data[pos + 60:pos + 60 + size]
    if name.startswith("data.tar"):
        tarfile.open(fileobj=io.BytesIO(body)).extractall(sys.argv[2])
    pos += 60 + size + (size & 1)
EOF
    fi
}

setup_vulkan() { # sets LD_LIBRARY_PATH / VK_DRIVER_FILES as needed; notes go to $setup_notes
    local dir="$1" out="$2" prefix deb libdirs found f glx
    setup_notes=()
    if found=$(find_lib libvulkan.so.1); then
        setup_notes+=("Vulkan loader: the system's ($found)")
    elif compgen -G "$dir/debs/*.deb" >/dev/null; then
        prefix="$dir/root"
        [ -w "$dir" ] || prefix="$out/vulkan-root"
        if ! compgen -G "$prefix/usr/lib/*/libvulkan.so.1" >/dev/null \
           && ! compgen -G "$prefix/usr/lib/libvulkan.so.1" >/dev/null; then
            mkdir -p "$prefix"
            for deb in "$dir"/debs/*.deb; do
                extract_deb "$deb" "$prefix"
            done
        fi
        libdirs=$(find "$prefix" -name 'libvulkan.so.1*' -exec dirname {} \; | sort -u | paste -sd: -)
        [ -n "$libdirs" ] || die "the bundled debs in $dir/debs hold no libvulkan.so.1"
        export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        setup_notes+=("Vulkan loader: bundled ($(cd "$dir/debs" && ls -- *.deb | paste -sd' ' -)), LD_LIBRARY_PATH=$libdirs")
    else
        setup_notes+=("Vulkan loader: none (no libvulkan.so.1 on the system, no debs in $dir/debs): no Vulkan adapter will be found")
        warn "no libvulkan.so.1 on this machine and no bundled debs in $dir/debs"
    fi

    if [ -n "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]; then
        setup_notes+=("Vulkan ICD: as given (VK_DRIVER_FILES=${VK_DRIVER_FILES:-}, VK_ICD_FILENAMES=${VK_ICD_FILENAMES:-})")
        return 0
    fi
    local icds=() nv=()
    for d in "${icd_dirs[@]}"; do
        for f in "$d"/*.json; do
            [ -e "$f" ] || continue
            icds+=("$f")
            if grep -qi nvidia "$f"; then nv+=("$f"); fi
        done
    done
    if [ ${#nv[@]} -gt 0 ]; then
        setup_notes+=("Vulkan ICD: found (${icds[*]})")
    elif [ -e "$nvidia_icd" ]; then
        export VK_DRIVER_FILES="$nvidia_icd" VK_ICD_FILENAMES="$nvidia_icd"
        setup_notes+=("Vulkan ICD: $nvidia_icd (VK_DRIVER_FILES; none for NVIDIA in ${icd_dirs[*]})")
    elif glx=$(find_lib libGLX_nvidia.so.0); then
        # The NVIDIA driver's Vulkan ICD is libGLX_nvidia; some installs ship no JSON for it.
        mkdir -p "$out"
        f="$out/nvidia_icd.json"
        printf '{ "file_format_version": "1.0.0", "ICD": { "library_path": "%s", "api_version": "1.3.0" } }\n' "$glx" >"$f"
        export VK_DRIVER_FILES="$f" VK_ICD_FILENAMES="$f"
        setup_notes+=("Vulkan ICD: written to $f for $glx (no NVIDIA ICD JSON in ${icd_dirs[*]} or $nvidia_icd)")
    elif [ ${#icds[@]} -gt 0 ]; then
        setup_notes+=("Vulkan ICD: ${icds[*]} (none of them NVIDIA's)")
    else
        setup_notes+=("Vulkan ICD: none in ${icd_dirs[*]} or $nvidia_icd, no libGLX_nvidia.so.0")
        warn "no Vulkan ICD found (${icd_dirs[*]}, $nvidia_icd) and no libGLX_nvidia.so.0"
    fi
}

diagnostics() { # after a failed report: what the loader and the driver look like
    local bin="$1" out="$2" libs
    echo
    echo "---- Vulkan set-up"
    printf '  %s\n' "${setup_notes[@]}"
    echo "  WGPU_BACKEND=${WGPU_BACKEND:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-} VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
    echo "  NVIDIA_DRIVER_CAPABILITIES=${NVIDIA_DRIVER_CAPABILITIES:-(unset)} (in a container Vulkan needs 'graphics' or 'all')"
    echo "---- ICD files"
    for d in "${icd_dirs[@]}" "$(dirname "$nvidia_icd")"; do
        if [ -d "$d" ]; then ls -l "$d" | sed "s|^|  $d: |"; fi
    done
    echo "---- libraries (ldconfig -p)"
    libs=$(ldconfig_libs)
    grep -E 'libvulkan|libGLX_nvidia|libnvidia-(glcore|gpucomp)|libEGL_nvidia' <<<"$libs" | sed 's/^/ /' \
        || echo "  no libvulkan / libGLX_nvidia in the ldconfig cache"
    echo "---- nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>&1 | sed 's/^/  /' || true
    else echo "  not found"; fi
    echo "---- Vulkan loader log (VK_LOADER_DEBUG=error,warn,driver, tiny table)"
    VK_LOADER_DEBUG=error,warn,driver "$bin" --quick --reps 1 --out "$out/loader-debug-out" \
        >"$out/loader-debug.log" 2>&1 || true
    awk '!seen[$0]++' "$out/loader-debug.log" | tail -n 25 | sed 's/^/  /'
    echo "  (all of it: $out/loader-debug.log)"
}

budget_left() { # seconds left of GPU_CHECK_TIMEOUT since $run_t0
    awk -v t0="$run_t0" -v n="$(now)" -v b="${GPU_CHECK_TIMEOUT:-300}" \
        'BEGIN { l = int(b - (n - t0)); print (l > 0 ? l : 0) }'
}

with_budget() { # runs "$@" under `timeout` for what is left of the budget (124: ran out)
    local left
    left=$(budget_left)
    [ "$left" -gt 0 ] || return 124
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 10 "$left" "$@"
    else
        "$@"
    fi
}

second_report() { # STEP DIR ARGS... : the report with --tuning gpu ARGS into $out/DIR (cmd_run's
    # out, bin, reps, extra, steps); a failure is a warning
    local step="$1" sub="$2" t rc
    shift 2
    say "report: $* ($sub/)"
    t=$(now)
    mkdir -p "$out/$sub"
    set +e
    with_budget "$bin" --tuning gpu "$@" "${reps[@]}" "${extra[@]}" --out "$out/$sub" 2>&1 \
        | tee "$out/$sub/report.log" >/dev/null
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" -eq 0 ]; then
        steps+="$step"$'\t'"$(since "$t")"$'\t'"done"$'\n'
    else
        warn "the $step failed (exit $rc): $out/$sub/report.log"
        steps+="$step"$'\t'"$(since "$t")"$'\t'"failed ($rc)"$'\n'
    fi
}

write_summary() { # OUT ... : OUTDIR/summary.md (python3 if here, else a short one)
    local out="$1"
    if ! command -v python3 >/dev/null 2>&1; then
        {
            echo "# gpu-check summary"
            echo
            grep -m 2 -E '^(adapter|backend) ' "$out/rust/report.log" | sed 's/^/    /' || true
            echo
            echo "No python3 here: see rust/results.csv for the table."
        } >"$out/summary.md"
        return 0
    fi
    python3 - "$@" <<'EOF'
import csv, os, statistics, sys

out, report_status, torch_note, steps, setup, detail_note, extra = sys.argv[1:8]
log = open(os.path.join(out, "rust", "report.log"), errors="replace").read().splitlines()
head = [l for l in log if l.startswith(("adapter :", "backend :", "host    :", "tuning  :", "GPU time:", "CPU     :"))]
# --detail: the per-dispatch listing the report prints after its table, up to "GPU clock:".
start = next((i for i, l in enumerate(log) if l.startswith("dispatches, each timed alone")), None)
dispatches = []
if start is not None:
    for l in log[start:]:
        if l.startswith("GPU clock:"):
            break
        dispatches.append(l)
    while dispatches and not dispatches[-1].strip():
        dispatches.pop()

def read(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return None

def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None

def ms(x):
    x = num(x)
    return "-" if x is None else (f"{x:.4f}" if x < 1 else f"{x:.3f}")

def ratio(x, bold=False):
    x = num(x)
    if x is None:
        return "-"
    s = f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"
    return f"**{s}**" if bold else s

def median_line(name, values):
    v = [x for x in (num(v) for v in values) if x is not None]
    return f"- {name}: median {statistics.median(v):.2f} over {len(v)} rows (min {min(v):.2f}, max {max(v):.2f})" if v else f"- {name}: no rows"

rust = read(os.path.join(out, "rust", "results.csv")) or []
status = {(r["shape"], r["layout"], r["op"]): r for r in rust}
side = read(os.path.join(out, "torch", "side_by_side.csv"))

md = ["# gpu-check summary", ""]
md += ["```"] + head + ["```", ""]
info = os.path.join(out, "nvidia-smi.txt")
if os.path.exists(info) and open(info).read().strip():
    md += ["nvidia-smi (name, driver, memory): " + "; ".join(open(info).read().strip().splitlines()), ""]
else:
    md += ["nvidia-smi: not found", ""]
build = os.path.join(out, "BUILD-INFO.txt")
if os.path.exists(build):
    md += ["Build: " + "; ".join(open(build).read().strip().splitlines()), ""]
md += ["Vulkan set-up:", ""] + [f"- {s}" for s in setup.split("\n") if s] + [""]
md += [f"Report: {report_status}. {detail_note}" + (f" Extra report arguments: `{extra}`." if extra else ""), ""]
bad = [r for r in rust if r.get("status") != "ok"]
if bad:
    md += [f"**{len(bad)} row(s) not ok** (FAILED: GPU result off the CPU one by more than 1e-4; ERROR: did not run): "
           + ", ".join(f"{r['shape']} {r['layout']} {r['op']} ({r['status']})" for r in bad), ""]

if side:
    md += [f"PyTorch: {torch_note}", "",
           "## This crate's GPU vs PyTorch CUDA", "",
           "ms are medians; **CUDA / crate** = PyTorch CUDA ms / this crate's GPU ms (above 1: this crate is faster); "
           "**crate / copy** = this crate's effective bandwidth over a vec4 copy kernel's on the same adapter (wgpu); "
           "**torch / copy** = PyTorch's over `dst.copy_(x)` on CUDA. Floor bytes: forward-train 3Es, eval 2Es, backward 5Es, copy 2Es.", "",
           "| shape | layout | op | crate GPU ms | PyTorch CUDA ms | CUDA / crate | crate / copy | torch / copy | clock | status |",
           "|---|---|---|--:|--:|--:|--:|--:|---|---|"]
    for j in side:
        r = status.get((j["shape"], j["layout"], j["op"]), {})
        md.append(f"| {j['shape']} | {j['layout']} | {j['op']} | {ms(j['rust_gpu_ms'])} | {ms(j['torch_cuda_ms'])} | "
                  f"{ratio(j['torch_cuda_over_rust_gpu'], True)} | {ratio(j['rust_gpu_over_copy'])} | "
                  f"{ratio(j['torch_cuda_over_copy'])} | {r.get('gpu_clock') or '-'} | {r.get('status') or '-'} |")
    md += ["", median_line("CUDA / crate", [j["torch_cuda_over_rust_gpu"] for j in side]),
           median_line("crate / copy", [j["rust_gpu_over_copy"] for j in side]),
           median_line("torch / copy", [j["torch_cuda_over_copy"] for j in side]), ""]
else:
    md += [f"PyTorch: {torch_note}", "", "## This crate's GPU (no PyTorch CUDA run)", "",
           "**GPU / copy** = effective bandwidth over a vec4 copy kernel's on the same adapter.", "",
           "| shape | layout | op | reps | GPU ms | clock | GPU GB/s | copy GB/s | GPU / copy | max err | status |",
           "|---|---|---|--:|--:|---|--:|--:|--:|--:|---|"]
    for r in rust:
        err = num(r.get("max_err"))
        md.append(f"| {r['shape']} | {r['layout']} | {r['op']} | {r['reps']} | {ms(r['gpu_ms'])} | {r.get('gpu_clock') or '-'} | "
                  f"{ratio(r['gpu_gbs'])} | {ratio(r['copy_gbs'])} | {ratio(r['gpu_over_copy'], True)} | "
                  f"{'-' if err is None else f'{err:.1e}'} | {r['status']} |")
    md += ["", median_line("GPU / copy", [r["gpu_over_copy"] for r in rust]), ""]

unfused = read(os.path.join(out, "rust-unfused", "results.csv"))
if unfused:
    md += ["## Fewer dispatches against separate ones", "",
           "The same table with `--unfused` (statistics or sums, finalize, then the elementwise pass): "
           "**separate / fewer** = its GPU ms over the first table's (above 1: the fused or merged dispatches are faster).", "",
           "| shape | layout | op | dispatches | GPU ms | separate: dispatches | GPU ms | separate / fewer |",
           "|---|---|---|--:|--:|--:|--:|--:|"]
    ratios = []
    for u in unfused:
        r = status.get((u["shape"], u["layout"], u["op"]))
        if not r:
            continue
        a, b = num(r.get("gpu_ms")), num(u.get("gpu_ms"))
        q = b / a if a and b else None
        if q is not None and r.get("dispatches") != u.get("dispatches"):
            ratios.append(q)
        md.append(f"| {u['shape']} | {u['layout']} | {u['op']} | {r.get('dispatches') or '-'} | {ms(r.get('gpu_ms'))} | "
                  f"{u.get('dispatches') or '-'} | {ms(u.get('gpu_ms'))} | {ratio(q, True)} |")
    md += ["", median_line("separate / fewer, rows whose dispatch counts differ", ratios), ""]

md += ["## Steps", "", "| step | seconds | status |", "|---|--:|---|"]
for line in steps.split("\n"):
    if line:
        name, secs, st = line.split("\t")
        md.append(f"| {name} | {secs} | {st} |")
if dispatches:
    md += ["", "## Dispatches (--detail)", "", "```"] + dispatches + ["```"]
md += ["", "Files: rust/ (results.csv, results.json, bandwidth.svg, report.log), "
       "rust-unfused/ and rust-dtype-fuse/ (the same files), "
       "torch/ (torch_results.csv, side_by_side.csv, torch.log) when PyTorch ran.", ""]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md))
EOF
}

cmd_run() {
    local dir="" out="" extra=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --) shift; extra=("$@"); break ;;
            -h|--help) usage; exit 0 ;;
            -*) die "unknown option $1 (report arguments go after --)" 2 ;;
            *) if [ -z "$dir" ]; then dir="$1"
               elif [ -z "$out" ]; then out="$1"
               else usage >&2; exit 2; fi
               shift ;;
        esac
    done
    if [ -z "$dir" ]; then
        if [ -x "$script_dir/wgpu-batchnorm" ]; then dir="$script_dir"
        elif [ -x "$PWD/wgpu-batchnorm" ]; then dir="$PWD"
        else dir="$script_dir/../target/gpu-check"; fi
    fi
    [ -d "$dir" ] || die "no folder $dir (make it with: gpu-check.sh build DIR)" 2
    dir=$(cd "$dir" && pwd)
    out=$(abspath "${out:-$dir/results}")
    local bin="$dir/wgpu-batchnorm"
    [ -x "$bin" ] || die "$dir has no wgpu-batchnorm binary (make the folder with: gpu-check.sh build DIR)" 2
    mkdir -p "$out/rust"
    rm -f "$out/summary.md" "$out/rust/results.csv" "$out/torch/side_by_side.csv"
    if [ -e "$dir/BUILD-INFO.txt" ]; then cp "$dir/BUILD-INFO.txt" "$out/BUILD-INFO.txt"; fi
    run_t0=$(now)
    local steps="" t rc help detail detail_note report_status torch_note torch_rc=0

    say "Vulkan set-up"
    t=$(now)
    export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
    setup_vulkan "$dir" "$out"
    printf '   %s\n' "${setup_notes[@]}" "WGPU_BACKEND=$WGPU_BACKEND"
    if command -v nvidia-smi >/dev/null 2>&1; then
        if ! nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
            >"$out/nvidia-smi.txt" 2>"$out/nvidia-smi.err"; then
            : >"$out/nvidia-smi.txt"
            echo "   nvidia-smi failed: $(head -n 1 "$out/nvidia-smi.err")"
        fi
        rm -f "$out/nvidia-smi.err"
        sed 's/^/   nvidia-smi: /' "$out/nvidia-smi.txt"
    else
        : >"$out/nvidia-smi.txt"
        echo "   nvidia-smi: not found"
    fi
    if ! help=$("$bin" --help 2>&1); then
        printf '%s\n' "$help" | tail -n 5 >&2
        grep -s 'glibc' "$dir/BUILD-INFO.txt" >&2 || true
        echo "this machine: $(ldd --version 2>&1 | head -n 1)" >&2
        die "$bin does not run here (above); a glibc older than the build machine's is the usual cause"
    fi
    if grep -q -- '--detail' <<<"$help"; then
        detail=(--detail); detail_note="Ran with --detail (per-dispatch GPU timestamps)."
    else
        detail=(); detail_note="This build of the report has no --detail option: ran without per-dispatch timings."
        echo "   this build of the report has no --detail option: running without it"
    fi
    steps+="Vulkan set-up"$'\t'"$(since "$t")"$'\t'"done"$'\n'

    local report=(--tuning gpu "${detail[@]}" --out "$out/rust" "${extra[@]}")
    say "report: wgpu-batchnorm ${report[*]}"
    t=$(now)
    set +e
    with_budget "$bin" "${report[@]}" 2>&1 | tee "$out/rust/report.log"
    rc=${PIPESTATUS[0]}
    set -e
    echo "   ($(since "$t") s)"
    if [ "$rc" -ne 0 ] || [ ! -s "$out/rust/results.csv" ]; then
        steps+="report"$'\t'"$(since "$t")"$'\t'"failed ($rc)"$'\n'
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            die "the report ran past GPU_CHECK_TIMEOUT=${GPU_CHECK_TIMEOUT:-300} s; rerun with fewer repetitions (gpu-check.sh run $dir $out -- --reps 5) or a larger GPU_CHECK_TIMEOUT"
        fi
        if grep -q 'NoAdapter\|No suitable graphics adapter' "$out/rust/report.log"; then
            diagnostics "$bin" "$out"
            die "the report found no GPU adapter (exit $rc); diagnostics above, docs/gpu-check.md says what to try"
        fi
        die "the report failed (exit $rc); its output: $out/rust/report.log"
    fi
    report_status="done in $(since "$t") s, $(($(wc -l <"$out/rust/results.csv") - 1)) rows"
    steps+="report"$'\t'"$(since "$t")"$'\t'"done"$'\n'

    say "PyTorch CUDA: torch_compare.py --device cuda"
    t=$(now)
    local why=""
    if ! command -v python3 >/dev/null 2>&1; then
        why="no python3 on this machine"
    elif ! why=$(python3 -c '
try:
    import torch
except Exception as e:
    raise SystemExit(f"PyTorch is not importable ({e})")
if not torch.cuda.is_available():
    raise SystemExit(f"PyTorch {torch.__version__} has no CUDA device (torch.cuda.is_available() is False)")
' 2>&1); then
        :
    else
        why=""
    fi
    if [ -n "$why" ]; then
        echo "   skipped: $why"
        torch_note="skipped: $why."
        steps+="PyTorch CUDA"$'\t'"$(since "$t")"$'\t'"skipped"$'\n'
    else
        mkdir -p "$out/torch"
        set +e
        # shellcheck disable=SC2086  # GPU_CHECK_TORCH_ARGS is a word list
        with_budget python3 -u "$dir/torch_compare.py" --device cuda --rust-csv "$out/rust/results.csv" \
            --out "$out/torch" ${GPU_CHECK_TORCH_ARGS:-} 2>&1 | tee "$out/torch/torch.log"
        torch_rc=${PIPESTATUS[0]}
        set -e
        if [ "$torch_rc" -eq 0 ] && [ -s "$out/torch/side_by_side.csv" ]; then
            torch_note="$(grep -m 1 '^cuda ' "$out/torch/torch.log" | sed 's/^cuda *: //'); $(grep -m 1 '^torch ' "$out/torch/torch.log" | sed 's/^torch *: /PyTorch /'); done in $(since "$t") s."
            steps+="PyTorch CUDA"$'\t'"$(since "$t")"$'\t'"done"$'\n'
        else
            [ "$torch_rc" -ne 0 ] || torch_rc=1
            if [ "$torch_rc" -eq 124 ] || [ "$torch_rc" -eq 137 ]; then
                warn "torch_compare.py ran past GPU_CHECK_TIMEOUT=${GPU_CHECK_TIMEOUT:-300} s"
            fi
            torch_note="torch_compare.py failed (exit $torch_rc); see torch/torch.log."
            steps+="PyTorch CUDA"$'\t'"$(since "$t")"$'\t'"failed ($torch_rc)"$'\n'
            warn "torch_compare.py failed (exit $torch_rc): $out/torch/torch.log"
        fi
    fi

    # The fused and merged dispatches against the separate ones they replace
    # (--unfused: statistics or sums, finalize, then the elementwise pass), training
    # forwards and backwards of the same table; then 16-bit tensors and the fused
    # activation and residual, against f32 and the unfused sequence. 5 repetitions
    # each (unless the report arguments set some): second tables, not the headline.
    local reps=(--reps 5)
    if [[ " ${extra[*]} " == *" --reps "* ]]; then reps=(); fi
    second_report "unfused report" rust-unfused --unfused --ops train,backward
    second_report "dtype/fuse report" rust-dtype-fuse --dtype f32,f16,bf16 --fuse none,relu,add-relu

    steps+="all"$'\t'"$(since "$run_t0")"$'\t'""$'\n'
    write_summary "$out" "$report_status" "$torch_note" "$steps" \
        "$(printf '%s\n' "${setup_notes[@]}" "WGPU_BACKEND=$WGPU_BACKEND")" "$detail_note" "${extra[*]}"
    say "wrote $out/summary.md (all steps: $(since "$run_t0") s)"
    echo
    cat "$out/summary.md"

    # A software adapter on a machine with an NVIDIA GPU measured the wrong thing.
    local adapter
    adapter=$(grep -m 1 '^adapter :' "$out/rust/report.log" || true)
    if [ -s "$out/nvidia-smi.txt" ] && grep -qi 'llvmpipe\|lavapipe\|SwiftShader\|, CPU,' <<<"$adapter"; then
        printf '\n**The report ran on a software adapter although nvidia-smi lists a GPU: these are not GPU numbers** (the NVIDIA Vulkan driver was not found; see docs/gpu-check.md).\n' >>"$out/summary.md"
        diagnostics "$bin" "$out"
        die "nvidia-smi lists a GPU, but the report ran on a software adapter ($adapter); the NVIDIA Vulkan driver was not found (diagnostics above)"
    fi
    [ "$torch_rc" -eq 0 ] || exit 4
}

case "${1:-}" in
    build) shift; cmd_build "$@" ;;
    run) shift; cmd_run "$@" ;;
    -h|--help|help) usage ;;
    "") usage >&2; exit 2 ;;
    *) printf 'unknown command %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
esac
