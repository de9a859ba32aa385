# Shared by the bench scripts (sourced after ROOT is set): what the binaries were built from,
# and the results file that SAVE=1 writes.

# The commit the binaries are built from, taken when they are built, not when the results are
# saved (an edit made while a run goes on is not in the binaries): "<sha>", with
# " + uncommitted changes" when `paths` differ from it.
built_from() { # paths...
    local sha
    sha=$(cd "$ROOT" && git rev-parse --short HEAD)
    if (cd "$ROOT" && git diff --quiet HEAD -- "$@"); then
        echo "$sha"
    else
        echo "$sha + uncommitted changes"
    fi
}

# Writes bench/results/<name>-<date>.md (or -<date-time>.md when that exists): a title, the
# command, the machine, the report and the raw lines.
save_results() { # name title command machine report raw-label raw-file
    local name=$1 title=$2 command=$3 machine=$4 report=$5 raw_label=$6 raw=$7 out
    mkdir -p "$ROOT/bench/results"
    out=$ROOT/bench/results/$name-$(date +%F).md
    [[ -e $out ]] && out=$ROOT/bench/results/$name-$(date +%F-%H%M%S).md
    {
        echo "# $title, $(date -u '+%F %H:%M UTC')"
        echo
        echo "Command: \`$command\`"
        echo "Machine: $machine"
        echo
        cat "$report"
        echo
        echo "$raw_label:"
        echo
        echo '```'
        cat "$raw"
        echo '```'
    } >"$out"
    printf '== saved %s\n' "$out" >&2
}
