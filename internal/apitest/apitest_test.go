package apitest

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"testing"
)

// cannedResponse is one response a test server gives, and whether the
// document allows it.
type cannedResponse struct {
	Name        string `json:"name"`
	Method      string `json:"method"`
	Path        string `json:"path"`
	Status      int    `json:"status"`
	Body        string `json:"body"`
	ContentType string `json:"contentType"`
	Allow       string `json:"allow"`
	Invalid     bool   `json:"invalid"`
}

// TestCheck serves each canned response over real HTTP and wants the
// validator to accept exactly the valid ones.
func TestCheck(t *testing.T) {
	data, err := os.ReadFile("testdata/responses.json")
	if err != nil {
		t.Fatal(err)
	}
	var cases []cannedResponse
	if err := json.Unmarshal(data, &cases); err != nil {
		t.Fatal(err)
	}
	v := New(t)
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				ct := tc.ContentType
				if ct == "" {
					ct = "application/json"
				}
				w.Header().Set("Content-Type", ct)
				if tc.Allow != "" {
					w.Header().Set("Allow", tc.Allow)
				}
				w.WriteHeader(tc.Status)
				_, _ = w.Write([]byte(tc.Body))
			}))
			defer srv.Close()
			req := NewRequest(t, tc.Method, srv.URL+tc.Path, "")
			resp, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			err = v.check(req, resp, []byte(tc.Body))
			if tc.Invalid && err == nil {
				t.Errorf("validator accepted an invalid response")
			}
			if !tc.Invalid && err != nil {
				t.Errorf("validator refused a valid response: %v", err)
			}
		})
	}
}

func TestUnexercised(t *testing.T) {
	v := New(t)
	all := v.Unexercised()
	if !slices.Contains(all, "GET /health") || !slices.Contains(all, "POST /volumes") || len(all) != 29 {
		t.Fatalf("unexercised before any check: %v", all)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte("[]"))
	}))
	defer srv.Close()
	v.Do(t, srv.Client(), NewRequest(t, "GET", srv.URL+"/api/v1/operations", ""))
	if got := v.Unexercised(); len(got) != len(all)-1 || slices.Contains(got, "GET /operations") {
		t.Errorf("unexercised after GET /operations: %v", got)
	}
}
