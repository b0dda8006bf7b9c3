package upgrade_test

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/volumed/volumed/internal/upgrade"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

var errCrash = errors.New("crash")

// TestPlanRun: data without a recorded format is detected; steps run in
// order from its format, each recorded once done; a failed step leaves
// the format before it; a newer format or a missing step is refused and
// nothing runs.
func TestPlanRun(t *testing.T) {
	for _, tc := range []struct {
		name     string
		recorded string // "" for none
		detected int
		failAt   int // the From of a step that fails; -1 none
		wantRan  []int
		wantFmt  string
		wantErr  error
	}{
		{name: "first start", detected: 3, failAt: -1, wantFmt: `{"format": 3}`},
		{name: "current", recorded: `{"format": 3}`, failAt: -1, wantFmt: `{"format": 3}`},
		{name: "unrecorded old", detected: 1, failAt: -1, wantRan: []int{1, 2}, wantFmt: `{"format": 3}`},
		{name: "recorded old", recorded: `{"format": 2}`, failAt: -1, wantRan: []int{2}, wantFmt: `{"format": 3}`},
		{name: "crash in the second step", detected: 1, failAt: 2, wantRan: []int{1, 2}, wantFmt: `{"format": 2}`, wantErr: errCrash},
		{name: "too new", recorded: `{"format": 4}`, failAt: -1, wantFmt: `{"format": 4}`, wantErr: upgrade.ErrRefused},
		{name: "too old", detected: 0, failAt: -1, wantErr: upgrade.ErrRefused},
		{name: "unreadable record", recorded: `v3`, failAt: -1, wantFmt: `v3`, wantErr: upgrade.ErrRefused},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			m := upgrade.FileMarker{Path: filepath.Join(t.TempDir(), "format.json")}
			if tc.recorded != "" {
				writeFile(t, m.Path, tc.recorded)
			}
			var ran []int
			step := func(from int) upgrade.Step {
				return upgrade.Step{From: from, Name: "step", Run: func(context.Context, *slog.Logger) error {
					ran = append(ran, from)
					if from == tc.failAt {
						return errCrash
					}
					return nil
				}}
			}
			err := upgrade.Plan{Name: "test", Current: 3, Marker: m, Steps: []upgrade.Step{step(2), step(1)},
				Detect: func(context.Context) (int, error) { return tc.detected, nil }}.Run(ctx, quiet)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("Run = %v, want %v", err, tc.wantErr)
			}
			if !slices.Equal(ran, tc.wantRan) {
				t.Errorf("ran steps from %v, want %v", ran, tc.wantRan)
			}
			if got := readFile(t, m.Path); got != tc.wantFmt {
				t.Errorf("recorded %q, want %q", got, tc.wantFmt)
			}
		})
	}
}
func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// readFile is the file's text without its final newline, "" if missing.
func readFile(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return ""
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSuffix(string(data), "\n")
}
