// Command barechi is the peer of volumed's POST /volumes in bench/accept.sh:
// a bare chi handler that decodes and validates the same body with the
// same code (commands.DecodeCreate) and answers 201 with an operation,
// recording nothing.
package main

import (
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8091", "address to serve on")
	flag.Parse()
	r := chi.NewRouter()
	r.Post("/api/v1/volumes", func(w http.ResponseWriter, r *http.Request) {
		var body json.RawMessage
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, commands.MaxBodyBytes)).Decode(&body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		req, err := commands.DecodeCreate(body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		raw, _ := json.Marshal(req)
		now := time.Now().UTC()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		_ = json.NewEncoder(w).Encode(commands.Operation{ID: "op-" + uuid.NewString(), Type: commands.OpCreate,
			Status: commands.StatusPending, Request: raw, CreatedAt: now, UpdatedAt: now})
	})
	srv := &http.Server{Addr: *listen, Handler: r, ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.ListenAndServe())
}
