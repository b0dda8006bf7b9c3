package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volumed/volumed/internal/testenv"
)

// TestMakeInstall stages `make install` in a temporary DESTDIR and checks
// what it lays down: both binaries answering --version with the version
// linked in, the README with every docs page, and systemd units that systemd-analyze verifies and rates at
// most 4.0 on its exposure scale (hardened).
func TestMakeInstall(t *testing.T) {
	for _, tool := range []string{"make", "systemd-analyze"} {
		_, err := exec.LookPath(tool)
		testenv.Require(t, err == nil, "needs %s", tool)
	}
	dest := t.TempDir()
	const version = "v0.0.0-install-test"
	cmd := exec.Command("make", "-C", "../..", "install", "DESTDIR="+dest, "VERSION="+version)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	for _, bin := range []string{"volumed", "volctl"} {
		out, err := exec.Command(filepath.Join(dest, "usr/local/bin", bin), "--version").CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), bin+" "+version+" ") {
			t.Fatalf("%s --version: %q %v", bin, out, err)
		}
	}
	// The README links to the pages under docs/: every one is installed beside it.
	pages, err := filepath.Glob("../../docs/*.md")
	if err != nil || len(pages) == 0 {
		t.Fatalf("no docs pages: %v", err)
	}
	docs := []string{"README.md"}
	for _, p := range pages {
		docs = append(docs, filepath.Join("docs", filepath.Base(p)))
	}
	for _, doc := range docs {
		if _, err := os.Stat(filepath.Join(dest, "usr/local/share/doc/volumed", doc)); err != nil {
			t.Fatal(err)
		}
	}
	for _, unit := range []string{"volumed.service", "volumed-agent.service"} {
		data, err := os.ReadFile(filepath.Join(dest, "etc/systemd/system", unit))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(data), "ExecStart=/usr/local/bin/volumed") {
			t.Fatalf("%s does not start the installed binary:\n%s", unit, data)
		}
		// systemd-analyze checks that ExecStart exists: point it at the staged binary.
		staged := filepath.Join(t.TempDir(), unit)
		fixed := strings.ReplaceAll(string(data), "/usr/local/bin/volumed", filepath.Join(dest, "usr/local/bin/volumed"))
		if err := os.WriteFile(staged, []byte(fixed), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("systemd-analyze", "verify", staged).CombinedOutput(); err != nil || len(out) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", unit, err, out)
		}
		if out, err := exec.Command("systemd-analyze", "security", "--offline=yes", "--threshold=40", staged).CombinedOutput(); err != nil {
			t.Errorf("%s is not hardened enough (exposure above 4.0): %v\n%s", unit, err, out)
		}
	}
}
