//! A well-formed component for some other contract: the host must reject it
//! as "not a plugin" when it is loaded.

wit_bindgen::generate!({
    inline: "
        package example:greeter;
        world greeter {
            export greet: func(name: string) -> string;
        }
    ",
});

struct Greeter;

impl Guest for Greeter {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Greeter);
