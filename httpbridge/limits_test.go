package httpbridge_test

import (
	"fmt"
	"net/http"
	"testing"

	"github.com/volumed/volumed/commands"
)

// TestListCappedWithoutLimit: a list that names no limit answers at most
// commands.MaxListLimit operations, the newest.
func TestListCappedWithoutLimit(t *testing.T) {
	h := newHarness(t, options{})
	for i := 0; i <= commands.MaxListLimit; i++ {
		h.seedOperation(t, fmt.Sprintf("op-00000000-0000-4000-8000-%012d", i), commands.OpDetach,
			commands.StatusPending, vol1, "", i)
	}
	resp, body := h.do(t, http.MethodGet, "/operations", "")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("list: %d %s", resp.StatusCode, body)
	}
	got := ids(t, body)
	if len(got) != commands.MaxListLimit || got[0] != fmt.Sprintf("op-00000000-0000-4000-8000-%012d", commands.MaxListLimit) {
		t.Fatalf("list without limit: %d operations, first %v; want the newest %d", len(got), got[:1], commands.MaxListLimit)
	}
}
