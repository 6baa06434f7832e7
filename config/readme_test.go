package config

import (
	"os"
	"reflect"
	"strings"
	"testing"
)

// TestDocsDocumentEveryKey keeps docs/configuration.md in step with the
// struct: a new key without documentation fails here.
func TestDocsDocumentEveryKey(t *testing.T) {
	readme, err := os.ReadFile("../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	var walk func(prefix string, typ reflect.Type)
	walk = func(prefix string, typ reflect.Type) {
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if name == "" || name == "-" {
				continue
			}
			key := prefix + name
			ft := f.Type
			for ft.Kind() == reflect.Slice || ft.Kind() == reflect.Map || ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct && ft.PkgPath() == typ.PkgPath() && ft.Name() != "" {
				if f.Type.Kind() == reflect.Map {
					walk(key+".NAME.", ft)
				} else if f.Type.Kind() != reflect.Slice {
					walk(key+".", ft)
				}
				continue
			}
			if !strings.Contains(string(readme), name+"`") {
				t.Errorf("docs/configuration.md does not document config key %s", key)
			}
		}
	}
	walk("", reflect.TypeOf(Config{}))
}
