"""The trainkit pytest plugin (entry point ``pytest11``). Declares options, fixtures and hooks only;
Ray, torch and moto are imported inside the fixtures that need them."""
