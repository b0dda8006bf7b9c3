package httpbridge_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/redisstore"
)

// TestOperationsPagination seeds 250 operations and walks GET /operations
// by cursor, with both stores: 100 a page by default, every operation once,
// newest first across pages, the next page named by X-Next-Cursor and Link
// until the last, filters kept, and a foreign cursor refused.
func TestOperationsPagination(t *testing.T) {
	stores := map[string]func(t *testing.T) state.Store{
		"embedded": func(*testing.T) state.Store { return nil },
		"redis": func(t *testing.T) state.Store {
			rs, err := redisstore.New(context.Background(), redisstore.Config{URL: testenv.StartRedis(t).URL(), Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = rs.Close(context.Background()) })
			return rs
		},
	}
	for name, store := range stores {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, options{store: store(t)})
			const total = 250
			for i := range total {
				status := commands.StatusCompleted
				if i%2 == 1 {
					status = commands.StatusPending
				}
				h.seedOperation(t, fmt.Sprintf("op-00000000-0000-4000-8000-%012d", i), commands.OpCreate, status, "", "", i)
			}
			walk := func(query string) (pages []int, all []commands.OperationSummary) {
				path := "/operations" + query
				for range total {
					resp, body := h.do(t, http.MethodGet, path, "")
					if resp.StatusCode != http.StatusOK {
						t.Fatalf("GET %s: %d %s", path, resp.StatusCode, body)
					}
					rows := decodeAs[[]commands.OperationSummary](t, body)
					pages, all = append(pages, len(rows)), append(all, rows...)
					next := resp.Header.Get(commands.NextCursorHeader)
					link := resp.Header.Get("Link")
					if next == "" {
						if link != "" {
							t.Fatalf("last page with a Link: %s", link)
						}
						return pages, all
					}
					if !strings.HasSuffix(link, `>; rel="next"`) || !strings.Contains(link, "cursor="+url.QueryEscape(next)) {
						t.Fatalf("Link %q does not name the next page (cursor %q)", link, next)
					}
					u, err := url.Parse(strings.TrimSuffix(strings.TrimPrefix(link, "<"), `>; rel="next"`))
					if err != nil {
						t.Fatal(err)
					}
					path = "/operations?" + u.RawQuery
				}
				t.Fatalf("no last page after %d pages", total)
				return nil, nil
			}
			pages, all := walk("")
			if fmt.Sprint(pages) != "[100 100 50]" {
				t.Fatalf("page sizes %v, want [100 100 50]", pages)
			}
			seen := map[string]bool{}
			for i, op := range all {
				if seen[op.ID] {
					t.Fatalf("operation %s listed twice", op.ID)
				}
				seen[op.ID] = true
				if i > 0 && !op.CreatedAt.Before(all[i-1].CreatedAt) {
					t.Fatalf("row %d (%s) not older than the one before", i, op.CreatedAt)
				}
			}
			pages, all = walk("?status=pending&limit=30")
			if len(all) != total/2 || pages[0] != 30 || len(pages) != 5 {
				t.Fatalf("pending pages %v (%d rows), want 125 rows 30 a page", pages, len(all))
			}
			for _, op := range all {
				if op.Status != commands.StatusPending {
					t.Fatalf("filter lost across pages: %+v", op)
				}
			}
			resp, body := h.do(t, http.MethodGet, "/operations?cursor=not-a-cursor", "")
			if e := decodeAs[commands.Error](t, body); resp.StatusCode != http.StatusBadRequest || e.Details["field"] != "cursor" {
				t.Fatalf("foreign cursor: %d %s", resp.StatusCode, body)
			}
		})
	}
}
