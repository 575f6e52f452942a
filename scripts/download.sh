#!/usr/bin/env bash
# Download Llama 2 weights, tokenizer, LICENSE and USE_POLICY.md from the presigned URL in
# Meta's email, resuming partial files, and check every file against Meta's md5 checklists
# (on Linux and macOS alike). Mirrors download.sh in Meta's llama repository; see usage().
# Written for bash 3.2 too (macOS): no ${x,,}, no associative arrays, no empty "${a[@]}".
set -euo pipefail

readonly ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"
readonly REQUEST_PAGE="https://llama.meta.com/llama-downloads/"

usage() {
    cat <<EOF
Usage: scripts/download.sh [--url URL] [--models LIST] [--target-dir DIR]

Downloads Meta's Llama 2 weights into DIR/llama-2-<model>/, the tokenizer, and Meta's
LICENSE and USE_POLICY.md into DIR, then checks every file's md5 against Meta's checklists.
Re-running resumes interrupted downloads.

  --url URL          the presigned URL from Meta's email (https://download.llamameta.net/*?...)
                     env: LLAMA_URL
  --models LIST      comma-separated, from: $ALL_MODELS
                     env: LLAMA_MODELS
  --target-dir DIR   where to put the files (default: the current directory)
                     env: LLAMA_TARGET_DIR
  -h, --help         show this help

Arguments win over environment variables. The URL and models are asked for on the terminal
only when neither gives them (an empty answer for models means all of them).
The downloader is wget, else curl; set LLAMA_DOWNLOADER=wget or curl to choose.
Request a download link (valid 24 hours) at $REQUEST_PAGE
EOF
}

die() {
    printf 'download.sh: %s\n' "$@" >&2
    exit 1
}

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

trim() {
    local s=$1
    s=${s#"${s%%[![:space:]]*}"}
    printf '%s' "${s%"${s##*[![:space:]]}"}"
}

# ask PROMPT: print the answer typed on the terminal; fails when stdin is not a terminal.
ask() {
    local answer=""
    [[ -t 0 ]] || return 1
    read -r -p "$1" answer || true
    trim "$answer"
}

# --- what to download -------------------------------------------------------------------

url=${LLAMA_URL:-}
models=${LLAMA_MODELS:-}
target=${LLAMA_TARGET_DIR:-}
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --url=*) url=${1#*=}; shift ;;
    --models=*) models=${1#*=}; shift ;;
    --target-dir=*) target=${1#*=}; shift ;;
    --url | --models | --target-dir)
        (($# >= 2)) || die "$1 needs a value (see --help)"
        case $1 in
        --url) url=$2 ;;
        --models) models=$2 ;;
        --target-dir) target=$2 ;;
        esac
        shift 2
        ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

if [[ -z $url ]]; then
    url=$(ask "Enter the URL from Meta's email: ") ||
        die "no download URL: pass --url URL or set LLAMA_URL (request one at $REQUEST_PAGE)"
fi
url=$(trim "$url")
[[ -n $url ]] || die "no download URL given"
[[ $url == *'*'* ]] ||
    die "the URL has no '*' in it; paste the whole URL from Meta's email" \
        "(https://download.llamameta.net/*?Policy=...&Signature=...&Key-Pair-Id=...)"
# Each file's URL is the presigned URL with its first '*' replaced by the file's path.
url_prefix=${url%%\**}
url_suffix=${url#*\*}

if [[ -z $models ]]; then
    models=$(ask "Enter the models to download ($ALL_MODELS), or press Enter for all: ") ||
        die "no models: pass --models LIST or set LLAMA_MODELS (from $ALL_MODELS)"
    [[ -n $models ]] || models=$ALL_MODELS
fi
model_list=()
IFS=',' read -r -a requested <<<"$models,"
for name in "${requested[@]}"; do
    name=$(trim "$name")
    [[ -n $name ]] || continue
    case $(lower "$name") in
    7b | 13b | 70b | 7b-chat | 13b-chat | 70b-chat) model_list+=("$(lower "$name")") ;;
    *) die "unknown model '$name'; valid models are $ALL_MODELS" ;;
    esac
done
((${#model_list[@]})) || die "no models given; choose from $ALL_MODELS"

target=${target:-.}
[[ ! -e $target || -d $target ]] || die "--target-dir $target is a file, not a folder: choose a folder"

# --- tools ------------------------------------------------------------------------------

case ${LLAMA_DOWNLOADER:-} in
"")
    if command -v wget >/dev/null 2>&1; then
        downloader=wget
    elif command -v curl >/dev/null 2>&1; then
        downloader=curl
    else
        die "neither wget nor curl is installed; install one of them" \
            "(apt-get install wget, dnf install wget, brew install wget) and re-run"
    fi
    ;;
wget | curl)
    downloader=$LLAMA_DOWNLOADER
    command -v "$downloader" >/dev/null 2>&1 ||
        die "LLAMA_DOWNLOADER=$downloader, but $downloader is not installed"
    ;;
*) die "LLAMA_DOWNLOADER must be wget or curl, not '$LLAMA_DOWNLOADER'" ;;
esac

if command -v md5sum >/dev/null 2>&1; then
    md5_tool=md5sum
elif command -v md5 >/dev/null 2>&1; then
    md5_tool=md5
else
    die "neither md5sum nor md5 is installed; one is needed to check the downloads"
fi

md5_of() {
    if [[ $md5_tool == md5sum ]]; then
        md5sum <"$1" | awk '{print $1}'
    else
        md5 -q "$1"
    fi
}

# --- downloading ------------------------------------------------------------------------

is_html() {
    [[ -s $1 ]] || return 1
    local start
    start=$(head -c 512 "$1" | LC_ALL=C tr -d '\000 \t\r\n' | head -c 13 | LC_ALL=C tr A-Z a-z)
    [[ $start == '<!doctypehtml' || $start == '<html'* ]]
}

die_html() {
    die "the download link returned a web page (HTML) instead of $1." \
        "The pasted link is not the download URL from Meta's email, or it has expired." \
        "Request a new link at $REQUEST_PAGE, copy the whole URL from the email" \
        "(https://download.llamameta.net/*?...), and re-run this script; downloads resume."
}

die_expired() {
    die "the server refused $1 with HTTP 403 Forbidden: the download link has expired" \
        "(Meta's links last 24 hours) or was copied incompletely." \
        "Request a new link at $REQUEST_PAGE and re-run this script with it;" \
        "finished and partial downloads are kept and resume."
}

# fetch PATH [resume]: download PATH into $target/PATH. With "resume", a partial file there is
# continued (weights are many GB); otherwise the file is fetched afresh and replaced only once
# complete, so a stale LICENSE or checklist never gets a newer tail appended.
fetch() {
    local path=$1 dest="$target/$1" out rc=0 status="" ctype="" response had_data=0
    mkdir -p "$(dirname "$dest")"
    if [[ ${2:-} == resume ]]; then
        out=$dest
        if is_html "$out"; then
            echo "Removing $out: it is a web page left by an earlier download, not a model file."
            rm -f "$out"
        fi
        [[ ! -s $out ]] || had_data=1
    else
        out="$dest.download"
        rm -f "$out"
    fi

    echo "Downloading $path"
    local file_url="$url_prefix$path$url_suffix"
    if [[ $downloader == wget ]]; then
        # wget reports the status and content type only in its log; tee it to keep the progress.
        LC_ALL=C wget --continue --no-verbose --server-response --show-progress --progress=bar:force \
            -O "$out" "$file_url" \
            2>&1 | tee "$tmp/wget.log" >&2 || rc=$?
        response=$(awk 'tolower($1) ~ /^http\// { status = $2; ctype = "" }
                        tolower($1) == "content-type:" { ctype = $2 }
                        END { print status, ctype }' "$tmp/wget.log")
    else
        response=$(curl --fail --location --continue-at - --progress-bar -o "$out" \
            --write-out '%{http_code} %{content_type}' "$file_url") || rc=$?
        if ((rc == 33)); then  # the server ignores Range: resuming would fail every time
            echo "The server cannot resume $path: downloading it from the start."
            rm -f "$out"
            rc=0
            response=$(curl --fail --location --progress-bar -o "$out" \
                --write-out '%{http_code} %{content_type}' "$file_url") || rc=$?
        fi
    fi
    read -r status ctype <<<"$response" || true
    [[ $status != 000 ]] || status=""  # curl's code when no response came
    ctype=$(lower "$ctype")
    # 416 to a resumed request: the file is already complete (the md5 check follows).
    if [[ $status == 416 && -s $out ]]; then
        echo "$path is already complete."
        rc=0
    fi

    # Drop what a failed fetch made, except partial weights that a re-run resumes.
    if ((rc != 0)) && [[ -f $out && ($out != "$dest" || ! -s $out) ]]; then
        rm -f "$out"
    fi
    if [[ $status == 403 ]]; then
        die_expired "$path"
    fi
    if is_html "$out" || [[ ($status == 200 || $status == 206) && $ctype == text/html* ]]; then
        if ((!had_data)) || is_html "$out"; then
            rm -f "$out"
        fi
        die_html "$path"
    fi
    if ((rc != 0)); then
        die "downloading $path failed (HTTP status ${status:-none}, $downloader exit code $rc)." \
            "Re-run this script to resume."
    fi
    [[ $out == "$dest" ]] || mv -f "$out" "$dest"
}

# verify DIR CHECKLIST: check each "<md5>  <file>" line of CHECKLIST (md5sum -c format) against
# the file under DIR, with whichever md5 tool exists, since macOS has no md5sum -c.
verify() {
    local dir=$1 checklist=$2 line expected name file actual failed="" checked=0
    echo "Checking md5 sums against $checklist"
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        [[ -n $(trim "$line") ]] || continue
        expected=$(lower "${line%% *}")
        name=${line#* }
        name=${name# }
        name=${name#\*}
        [[ $expected =~ ^[0-9a-f]{32}$ && -n $name ]] || die "$checklist: malformed line '$line'"
        file="$dir/$name"
        checked=$((checked + 1))
        if [[ ! -f $file ]]; then
            echo "MISSING  $file" >&2
            failed="$failed $file"
            continue
        fi
        actual=$(md5_of "$file")
        if [[ $actual == "$expected" ]]; then
            echo "OK       $file"
        else
            echo "MISMATCH $file: md5 is $actual, checklist says $expected" >&2
            failed="$failed $file"
        fi
    done <"$checklist"
    ((checked)) || die "$checklist lists no files; delete it and re-run this script"
    if [[ -n $failed ]]; then
        die "checksum check failed for:$failed" \
            "Delete the file(s) named above and re-run this script to download them again."
    fi
}

# --- main -------------------------------------------------------------------------------

tmp=$(mktemp -d "${TMPDIR:-/tmp}/llama-download.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$target"
echo "Downloading into $target with $downloader"

fetch LICENSE
fetch USE_POLICY.md
fetch tokenizer.model resume
fetch tokenizer_checklist.chk
verify "$target" "$target/tokenizer_checklist.chk"

for model in "${model_list[@]}"; do
    folder="llama-2-$model"
    case $model in
    7b*) shards=1 ;;
    13b*) shards=2 ;;
    70b*) shards=8 ;;
    esac
    fetch "$folder/params.json"
    fetch "$folder/checklist.chk"
    for ((s = 0; s < shards; s++)); do
        fetch "$folder/consolidated.$(printf '%02d' "$s").pth" resume
    done
    verify "$target/$folder" "$target/$folder/checklist.chk"
done

echo "Done. The weights are governed by Meta's LICENSE and USE_POLICY.md, saved in $target."
