package httpbridge_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/volumed/volumed/httpbridge"
	"github.com/volumed/volumed/internal/testenv"
)

// openAPITools is where `make deps` installs the npm validators.
const openAPITools = "../tools/openapi/node_modules/.bin"

// openAPITool finds an npm validator in the project's node_modules, else
// on PATH; it skips (fails under CI=true) when neither has it.
func openAPITool(t *testing.T, name string) string {
	t.Helper()
	if p, err := filepath.Abs(filepath.Join(openAPITools, name)); err == nil {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	p, err := exec.LookPath(name)
	testenv.Require(t, err == nil, "%s not installed (make deps: npm ci --prefix tools/openapi)", name)
	return p
}

// TestOpenAPIDocumentLints runs swagger-cli validate and redocly lint
// (recommended ruleset) over the served document: zero errors. The same
// tools must refuse the document as it was before it was fixed (an empty
// required list, no security declared), so the check can fail.
func TestOpenAPIDocumentLints(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "openapi.json")
	bad := filepath.Join(dir, "openapi-broken.json")
	served := string(httpbridge.OpenAPI())
	broken := strings.Replace(served, `"additionalProperties": false`, `"required": [], "additionalProperties": false`, 1)
	broken = strings.Replace(broken, `"security": [`, `"x-no-security": [`, 1)
	if broken == served {
		t.Fatal("could not break the document")
	}
	for path, data := range map[string]string{good: served, bad: broken} {
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	tools := []struct {
		tool string
		args func(doc string) []string
	}{
		{"swagger-cli", func(doc string) []string { return []string{"validate", doc} }},
		{"redocly", func(doc string) []string { return []string{"lint", "--extends=recommended", "--format=stylish", doc} }},
	}
	for _, tc := range tools {
		t.Run(tc.tool, func(t *testing.T) {
			bin := openAPITool(t, tc.tool)
			run := func(doc string) (string, error) {
				cmd := exec.Command(bin, tc.args(doc)...)
				cmd.Env = append(os.Environ(), "REDOCLY_TELEMETRY=off", "REDOCLY_SUPPRESS_UPDATE_NOTICE=true", "NO_COLOR=1")
				out, err := cmd.CombinedOutput()
				return string(out), err
			}
			if out, err := run(good); err != nil {
				t.Fatalf("%s refuses the served document: %v\n%s", tc.tool, err, out)
			}
			if out, err := run(bad); err == nil {
				t.Fatalf("%s accepts a broken document, so this test cannot fail:\n%s", tc.tool, out)
			}
		})
	}
}
