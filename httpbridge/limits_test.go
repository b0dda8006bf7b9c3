package httpbridge_test

import (
	"fmt"
	"net/http"
	"testing"

	"github.com/volumed/volumed/commands"
)

// TestListCappedWithoutLimit: a list that names no limit answers one page
// of commands.DefaultListLimit operations, the newest; a limit is capped at
// commands.MaxListLimit.
func TestListCappedWithoutLimit(t *testing.T) {
	h := newHarness(t, options{})
	for i := 0; i <= commands.MaxListLimit; i++ {
		h.seedOperation(t, fmt.Sprintf("op-00000000-0000-4000-8000-%012d", i), commands.OpDetach,
			commands.StatusPending, vol1, "", i)
	}
	newest := fmt.Sprintf("op-00000000-0000-4000-8000-%012d", commands.MaxListLimit)
	for _, tc := range []struct {
		query string
		want  int
	}{
		{"", commands.DefaultListLimit},
		{"?limit=1000", commands.MaxListLimit},
	} {
		resp, body := h.do(t, http.MethodGet, "/operations"+tc.query, "")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("list%s: %d %s", tc.query, resp.StatusCode, body)
		}
		got := ids(t, body)
		if len(got) != tc.want || got[0] != newest {
			t.Fatalf("list%s: %d operations, first %v; want the newest %d", tc.query, len(got), got[:1], tc.want)
		}
		if resp.Header.Get("X-Next-Cursor") == "" {
			t.Fatalf("list%s: no next cursor, although older operations remain", tc.query)
		}
	}
	if resp, body := h.do(t, http.MethodGet, "/operations?limit=1001", ""); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("limit above the cap: %d %s", resp.StatusCode, body)
	}
}
